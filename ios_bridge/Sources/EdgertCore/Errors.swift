import Foundation

/// Errors of the bridge, each with a one-line description naming the problem.
public enum EdgertError: LocalizedError, Sendable, Equatable {
    /// The manifest is missing a field, has another format, or names what this bridge lacks.
    case manifest(String)
    /// A file the package should hold is not there.
    case missingFile(String)
    /// `tokenizer.json` uses a component this tokenizer does not implement, or is malformed.
    case tokenizer(String)
    /// The package's chat template could not be reduced to role prefixes and suffixes at
    /// export (the reason is the exporter's), or the conversation does not fit the format.
    case chatFormat(String)
    /// The tokens do not fit the package's context.
    case contextFull(needed: Int, context: Int)
    /// The model failed to produce logits.
    case prediction(String)
    /// Nothing to generate from.
    case emptyPrompt
    /// A second generation was started while one is running on the same session.
    case busy

    public var errorDescription: String? {
        switch self {
        case .manifest(let why):
            return "edgert manifest: \(why)"
        case .missingFile(let path):
            return "missing file: \(path)"
        case .tokenizer(let why):
            return "tokenizer: \(why)"
        case .chatFormat(let why):
            return "chat format: \(why)"
        case .contextFull(let needed, let context):
            return "\(needed) tokens do not fit the package's context of \(context)"
        case .prediction(let why):
            return "prediction failed: \(why)"
        case .emptyPrompt:
            return "empty prompt: nothing to generate from"
        case .busy:
            return "a generation is already running on this session"
        }
    }
}
