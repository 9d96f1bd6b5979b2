import Foundation

/// The hook an app implements with the tokenizer library of its choice (e.g. one that reads
/// `tokenizer.json`). The files come with the package: `tokenizerFolder` in `EdgertModel`.
public protocol EdgertTokenizer {
    /// Token ids for `text`, special tokens included where the model expects them (BOS).
    func encode(_ text: String) -> [Int]
    /// Text for `tokens`; called with all tokens generated so far.
    func decode(_ tokens: [Int]) -> String
    /// Token ids of a conversation rendered with the model's chat template
    /// (`Manifest.chatTemplate`, a Jinja template), ending with the assistant's turn opened.
    func encodeChat(_ messages: [ChatMessage]) -> [Int]
}

/// One turn of a conversation.
public struct ChatMessage: Sendable {
    public let role: String
    public let content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

extension EdgertTokenizer {
    /// Without a template engine: "role: content" lines and an open assistant turn.
    public func encodeChat(_ messages: [ChatMessage]) -> [Int] {
        let text = messages.map { "\($0.role): \($0.content)\n" }.joined() + "assistant: "
        return encode(text)
    }
}

/// Turns tokens into text as they arrive: emits only the text that later tokens cannot change
/// (decoding all tokens and holding back a trailing incomplete UTF-8 character).
public struct StreamingDetokenizer {
    private let tokenizer: EdgertTokenizer
    private var tokens: [Int] = []
    private var emitted = ""

    public init(_ tokenizer: EdgertTokenizer) {
        self.tokenizer = tokenizer
    }

    /// The new text after adding `token` (may be empty).
    public mutating func add(_ token: Int) -> String {
        tokens.append(token)
        let text = tokenizer.decode(tokens)
        if text.hasSuffix("\u{FFFD}") || !text.hasPrefix(emitted) {
            return ""
        }
        let segment = String(text.dropFirst(emitted.count))
        emitted = text
        return segment
    }
}
