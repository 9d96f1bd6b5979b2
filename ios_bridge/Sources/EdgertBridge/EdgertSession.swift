import CoreML
import Foundation

/// A conversation over one `EdgertModel`: the KV state and the tokens it holds. A new prompt
/// that starts with the cached tokens feeds only the rest (the causal mask hides stale slots).
public final class EdgertSession {
    public let model: EdgertModel
    public private(set) var state: MLState
    /// The tokens whose keys and values are in the cache, in order.
    public private(set) var cachedTokens: [Int] = []

    public init(model: EdgertModel) {
        self.model = model
        state = model.makeState()
    }

    /// Start over with an empty cache.
    public func reset() {
        state = model.makeState()
        cachedTokens = []
    }

    /// Prefill `prompt`, then generate up to `maxTokens` tokens. `onToken` sees each one and
    /// returns false to stop; a stop token of the manifest ends the reply (not returned).
    @discardableResult
    public func generate(prompt: [Int], maxTokens: Int, sampling: Sampling = .greedy,
                         onToken: (Int) -> Bool = { _ in true }) throws -> [Int]
    {
        guard !prompt.isEmpty else {
            throw EdgertError.prediction("empty prompt")
        }
        var keep = 0
        let shared = min(cachedTokens.count, prompt.count - 1)
        while keep < shared && cachedTokens[keep] == prompt[keep] {
            keep += 1
        }
        cachedTokens = Array(prompt[..<keep])

        var logits: [Float] = []
        var start = keep
        while start < prompt.count {
            let end = min(start + model.manifest.prefillMaxLength, prompt.count)
            logits = try model.predict(Array(prompt[start..<end]), position: start, state: state)
            cachedTokens.append(contentsOf: prompt[start..<end])
            start = end
        }

        var sampler = Sampler(sampling)
        let stops = Set(model.manifest.stopTokenIds)
        var generated: [Int] = []
        while generated.count < maxTokens {
            let token = sampler.next(logits)
            if stops.contains(token) {
                break
            }
            generated.append(token)
            if !onToken(token) || generated.count == maxTokens {
                break
            }
            logits = try model.predict([token], position: cachedTokens.count, state: state)
            cachedTokens.append(token)
        }
        return generated
    }

    /// Reply to a conversation with streamed text: `onText` gets each new piece and returns
    /// false to stop. Returns the whole reply.
    @discardableResult
    public func reply(to messages: [ChatMessage], tokenizer: EdgertTokenizer, maxTokens: Int,
                      sampling: Sampling = .greedy,
                      onText: (String) -> Bool = { _ in true }) throws -> String
    {
        var detokenizer = StreamingDetokenizer(tokenizer)
        var text = ""
        try generate(prompt: tokenizer.encodeChat(messages), maxTokens: maxTokens,
                     sampling: sampling) { token in
            let piece = detokenizer.add(token)
            text += piece
            return piece.isEmpty || onText(piece)
        }
        return text
    }
}
