import Foundation

/// One turn of a conversation.
public struct ChatMessage: Sendable, Equatable, Codable {
    public let role: String
    public let content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }

    public static func system(_ content: String) -> ChatMessage { .init(role: "system", content: content) }
    public static func user(_ content: String) -> ChatMessage { .init(role: "user", content: content) }
    public static func assistant(_ content: String) -> ChatMessage { .init(role: "assistant", content: content) }
}

/// The model's chat template reduced at export to what it writes around plain-text messages
/// (manifest `chat_format`):
///
///     begin + (first message not a system one ? defaultSystem : "")
///       + for each message: roles[role].prefix + content + roles[role].suffix
///       + (addGenerationPrompt ? generationPrompt : "")
///
/// The exporter checked this against jinja2's rendering of sample conversations. A template
/// it could not reduce (tools, conditions on content, system text moved into a user turn)
/// is `type` "unsupported" with the exporter's reason, and rendering refuses: the bridge
/// does not guess a format.
public struct ChatFormat: Decodable, Sendable {
    /// What one role's message is wrapped in.
    public struct Role: Decodable, Sendable {
        public let role: String
        public let prefix: String
        public let suffix: String
    }

    /// "role_affixes", or "unsupported".
    public let type: String
    /// Why the template could not be reduced (unsupported only).
    public let reason: String?
    public let begin: String?
    public let defaultSystem: String?
    public let roles: [Role]?
    public let generationPrompt: String?
    /// The template trims whitespace around each message's content.
    public let trimContent: Bool?
    /// A system message may come after the first message.
    public let systemAnywhere: Bool?

    /// The conversation as prompt text, exactly as the model's template renders it.
    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool = true) throws -> String {
        guard type == "role_affixes", let roles else {
            throw EdgertError.chatFormat(reason ?? "the package's chat template is not reduced " +
                                         "(format \(type))")
        }
        var text = begin ?? ""
        if messages.first?.role != "system" { text += defaultSystem ?? "" }
        for (i, message) in messages.enumerated() {
            guard let affixes = roles.first(where: { $0.role == message.role }) else {
                throw EdgertError.chatFormat("role \(message.role) is not in the model's " +
                                             "template (roles: \(roles.map(\.role)))")
            }
            if message.role == "system", i > 0, systemAnywhere != true {
                throw EdgertError.chatFormat("a system message must come first")
            }
            var content = message.content
            if trimContent == true { content = ChatFormat.trimmed(content) }
            text += affixes.prefix + content + affixes.suffix
        }
        if addGenerationPrompt { text += generationPrompt ?? "" }
        return text
    }

    /// Jinja's `trim` (Python's str.strip(): Unicode whitespace at both ends).
    static func trimmed(_ s: String) -> String {
        var scalars = Array(s.unicodeScalars)[...]
        while let f = scalars.first, f.properties.isWhitespace { scalars.removeFirst() }
        while let l = scalars.last, l.properties.isWhitespace { scalars.removeLast() }
        return Array(scalars).string
    }
}
