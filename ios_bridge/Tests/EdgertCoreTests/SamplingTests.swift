import EdgertCore
import XCTest

final class SamplingTests: XCTestCase {
    let logits: [Float] = [1, 2, 3, 0.5, 2.5, -1]

    func testGreedyIsArgmaxFirstOnTies() throws {
        var sampler = Sampler(.greedy)
        XCTAssertEqual(try sampler.next([0.5, 3, -1, 3]), 1)
        XCTAssertThrowsError(try sampler.next([]))
    }

    func testSameSeedSameTokensOtherSeedOthers() throws {
        let p = SamplingParameters(temperature: 0.9, seed: 7)
        var a = Sampler(p), b = Sampler(p)
        var c = Sampler(SamplingParameters(temperature: 0.9, seed: 8))
        let first = try (0..<64).map { _ in try a.next(logits) }
        XCTAssertEqual(first, try (0..<64).map { _ in try b.next(logits) })
        XCTAssertNotEqual(first, try (0..<64).map { _ in try c.next(logits) })
        XCTAssertGreaterThan(Set(first).count, 2)
    }

    /// Draw frequencies follow softmax(logits / T) over the candidates top-k / top-p keep.
    func testFrequenciesFollowTheDistribution() throws {
        for p in [SamplingParameters(temperature: 0.7, seed: 1),
                  SamplingParameters(temperature: 1.3, topK: 3, seed: 2),
                  SamplingParameters(temperature: 1, topP: 0.8, seed: 3)]
        {
            var sampler = Sampler(p)
            let n = 40000
            var counts = [Int](repeating: 0, count: logits.count)
            for _ in 0..<n { counts[try sampler.next(logits)] += 1 }
            let t = Double(p.temperature)
            var weights = logits.map { exp(Double($0) / t) }
            let order = logits.indices.sorted { logits[$0] > logits[$1] }
            var kept = Set(order)
            if p.topK > 0 { kept = Set(order.prefix(p.topK)) }
            if p.topP > 0 {
                let total = weights.reduce(0, +)
                var mass = 0.0, keep: [Int] = []
                for i in order where mass < Double(p.topP) * total {
                    mass += weights[i]
                    keep.append(i)
                }
                kept = Set(keep)
            }
            for i in weights.indices where !kept.contains(i) { weights[i] = 0 }
            let total = weights.reduce(0, +)
            for i in logits.indices {
                XCTAssertEqual(Double(counts[i]) / Double(n), weights[i] / total, accuracy: 0.01,
                               "\(p) token \(i)")
            }
        }
    }
}
