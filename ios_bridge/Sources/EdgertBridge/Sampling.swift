import Foundation

/// How the next token is chosen from the logits.
public struct Sampling: Sendable {
    /// 0 picks the most likely token (greedy).
    public var temperature: Float
    /// Keep the k most likely tokens before sampling (0: all).
    public var topK: Int
    /// Same seed, same tokens.
    public var seed: UInt64

    public init(temperature: Float = 0, topK: Int = 0, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.seed = seed
    }

    public static let greedy = Sampling()
}

/// SplitMix64: a small seedable generator, so that sampling is reproducible.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) {
        state = seed
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Picks tokens from logits: argmax, or softmax(logits / temperature) over the top k.
public struct Sampler {
    public let sampling: Sampling
    private var rng: SplitMix64

    public init(_ sampling: Sampling) {
        self.sampling = sampling
        rng = SplitMix64(seed: sampling.seed)
    }

    /// The index of the largest logit (the first one on ties, as numpy's argmax).
    public static func argmax(_ logits: [Float]) -> Int {
        var best = 0
        for i in 1..<logits.count where logits[i] > logits[best] {
            best = i
        }
        return best
    }

    public mutating func next(_ logits: [Float]) -> Int {
        if sampling.temperature <= 0 {
            return Sampler.argmax(logits)
        }
        var candidates = Array(logits.indices)
        if sampling.topK > 0 && sampling.topK < logits.count {
            candidates.sort { logits[$0] > logits[$1] }
            candidates = Array(candidates.prefix(sampling.topK))
        }
        let top = candidates.map { logits[$0] }.max() ?? 0
        let weights = candidates.map { expf((logits[$0] - top) / sampling.temperature) }
        let total = weights.reduce(0, +)
        var u = Float(Double(rng.next() >> 11) / Double(1 << 53)) * total
        for (token, weight) in zip(candidates, weights) {
            u -= weight
            if u <= 0 {
                return token
            }
        }
        return candidates[candidates.count - 1]
    }
}
