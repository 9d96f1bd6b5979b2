import XCTest
@testable import EdgertBridge

/// Runs on a Mac with `swift test` (see docs/coreml-on-a-mac.md). EDGERT_TEST_PACKAGE names an
/// exported .mlpackage for the end-to-end test.
final class ManifestTests: XCTestCase {
    func testHalfBits() {
        XCTAssertEqual(EdgertModel.halfBits(0), 0x0000)
        XCTAssertEqual(EdgertModel.halfBits(1), 0x3C00)
        XCTAssertEqual(EdgertModel.halfBits(-2), 0xC000)
        XCTAssertEqual(EdgertModel.halfBits(-1e4), 0xF0E2)
        XCTAssertEqual(EdgertModel.halfBits(1e6), 0x7C00)
    }

    func testGreedyIsArgmax() {
        var sampler = Sampler(.greedy)
        XCTAssertEqual(sampler.next([0.5, 3, -1, 3]), 1)
    }

    func testSeededSamplingRepeats() {
        let logits: [Float] = [1, 2, 3, 0.5, 2.5]
        var a = Sampler(Sampling(temperature: 0.8, topK: 3, seed: 7))
        var b = Sampler(Sampling(temperature: 0.8, topK: 3, seed: 7))
        let first = (0..<20).map { _ in a.next(logits) }
        XCTAssertEqual(first, (0..<20).map { _ in b.next(logits) })
        XCTAssertTrue(first.allSatisfy { [1, 2, 4].contains($0) })
    }

    func testExportedPackage() async throws {
        guard let path = ProcessInfo.processInfo.environment["EDGERT_TEST_PACKAGE"] else {
            throw XCTSkip("set EDGERT_TEST_PACKAGE to an exported .mlpackage")
        }
        let model = try await EdgertModel.load(URL(fileURLWithPath: path),
                                               computeUnits: .cpuAndGPU)
        XCTAssertEqual(model.manifest.functions.keys.sorted(), [IONames.decode, IONames.prefill])
        let session = EdgertSession(model: model)
        let tokens = try session.generate(prompt: [1, 9690, 314, 253], maxTokens: 8)
        XCTAssertFalse(tokens.isEmpty)
        print("greedy tokens:", tokens)
    }
}
