import Foundation

/// How the next token is chosen from the logits.
public struct SamplingParameters: Sendable, Equatable {
    /// 0 picks the most likely token (greedy).
    public var temperature: Float
    /// Keep the k most likely tokens (0: all).
    public var topK: Int
    /// Keep the most likely tokens whose probabilities sum to at least p (0 or 1: all).
    public var topP: Float
    /// The seed of the generator: the same seed gives the same tokens.
    public var seed: UInt64

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 0, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
    }

    public static let greedy = SamplingParameters()
}

/// SplitMix64: a small seedable generator, so that sampling is reproducible everywhere.
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

/// Picks tokens from logits: argmax, or a draw from softmax(logits / temperature) over the
/// top-k / top-p candidates.
public struct Sampler: Sendable {
    public let parameters: SamplingParameters
    private var rng: SplitMix64

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        rng = SplitMix64(seed: parameters.seed)
    }

    /// The index of the largest logit (the first one on ties, as numpy's argmax).
    public static func argmax(_ logits: [Float]) -> Int {
        var best = 0
        for i in logits.indices.dropFirst() where logits[i] > logits[best] {
            best = i
        }
        return best
    }

    /// The probabilities the draw uses: (token, probability) of the candidates, most likely
    /// first, summing to 1.
    public func distribution(_ logits: [Float]) -> [(token: Int, probability: Float)] {
        let t = max(parameters.temperature, 1e-6)
        var order = Array(logits.indices)
        order.sort { logits[$0] != logits[$1] ? logits[$0] > logits[$1] : $0 < $1 }
        if parameters.topK > 0 { order = Array(order.prefix(parameters.topK)) }
        let top = logits[order[0]]
        var weights = order.map { expf((logits[$0] - top) / t) }
        var total = weights.reduce(0, +)
        if parameters.topP > 0 && parameters.topP < 1 {
            var kept = 0
            var mass: Float = 0
            while kept < weights.count && mass < parameters.topP * total {
                mass += weights[kept]
                kept += 1
            }
            order = Array(order.prefix(kept))
            weights = Array(weights.prefix(kept))
            total = mass
        }
        return zip(order, weights).map { ($0, $1 / total) }
    }

    /// The next token. Throws on empty logits.
    public mutating func next(_ logits: [Float]) throws -> Int {
        guard !logits.isEmpty else { throw EdgertError.prediction("no logits to sample from") }
        if parameters.temperature <= 0 {
            return Sampler.argmax(logits)
        }
        let candidates = distribution(logits)
        var u = Float(Double(rng.next() >> 11) / Double(1 << 53))
        for (token, p) in candidates {
            u -= p
            if u < 0 { return token }
        }
        return candidates[candidates.count - 1].token
    }
}
