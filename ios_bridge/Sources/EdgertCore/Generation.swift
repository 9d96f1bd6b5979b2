import Foundation

/// What the generation loop needs to know about a model.
public struct ModelInfo: Sendable, Equatable {
    /// Positions the model's state holds.
    public let contextLength: Int
    /// Length of each logits vector.
    public let vocabularySize: Int
    /// The most tokens one `logits(for:at:)` call takes.
    public let maxChunkLength: Int
    /// Feeding tokens at an earlier position rewinds the state (a positional KV cache).
    /// False for recurrent states, which only go forward: a conversation that changes an
    /// earlier token starts over.
    public let canRewind: Bool

    public init(contextLength: Int, vocabularySize: Int, maxChunkLength: Int, canRewind: Bool) {
        self.contextLength = contextLength
        self.vocabularySize = vocabularySize
        self.maxChunkLength = maxChunkLength
        self.canRewind = canRewind
    }
}

/// A model that turns tokens into next-token logits, holding its own state (KV cache or
/// recurrent state) between calls. `CoreMLLanguageModel` (EdgertBridge) is one; tests
/// replay recorded logits through another.
public protocol LanguageModel: Actor {
    nonisolated var info: ModelInfo { get }
    /// Forget every token: a fresh state.
    func resetState() async throws
    /// Feed `tokens` (1...maxChunkLength of them) at positions `position...`; the state keeps
    /// what came before `position` and drops anything after. Returns the logits after the
    /// last token (`vocabularySize` floats).
    func logits(for tokens: [Int], at position: Int) async throws -> [Float]
}

/// Settings of one generation.
public struct GenerateParameters: Sendable, Equatable {
    /// The most tokens to generate.
    public var maxTokens: Int
    public var sampling: SamplingParameters

    public init(maxTokens: Int = 256, sampling: SamplingParameters = .greedy) {
        self.maxTokens = maxTokens
        self.sampling = sampling
    }
}

/// Why a generation ended.
public enum FinishReason: String, Sendable, Equatable {
    /// A stop token came (it is neither returned nor fed).
    case stop
    /// `maxTokens` were generated.
    case length
    /// The model's context is full.
    case contextFull
    /// The consumer stopped listening or the task was cancelled.
    case cancelled
}

/// Counts and timings of one generation.
public struct GenerationInfo: Sendable, Equatable {
    public let promptTokens: Int
    /// Prompt tokens already in the state from earlier turns (not fed again).
    public let reusedTokens: Int
    public let generatedTokens: Int
    public let finishReason: FinishReason
    public let promptSeconds: Double
    public let generateSeconds: Double

    /// Prompt tokens fed per second.
    public var promptTokensPerSecond: Double {
        promptSeconds > 0 ? Double(promptTokens - reusedTokens) / promptSeconds : 0
    }

    /// Generated tokens per second (the first one comes with the prompt).
    public var tokensPerSecond: Double {
        generateSeconds > 0 ? Double(max(generatedTokens - 1, 0)) / generateSeconds : 0
    }
}

/// One event of a generation stream.
public enum Generation: Sendable, Equatable {
    /// A generated token (before its text).
    case token(Int)
    /// New text: final, never taken back.
    case chunk(String)
    /// The last event: counts, timings and why it ended.
    case info(GenerationInfo)
}

/// A conversation with a model: its messages, and the tokens its model state holds, so that
/// each turn feeds only what follows the longest prefix shared with the state.
///
/// ```swift
/// let session = ChatSession(model: model, tokenizer: tokenizer, format: format,
///                           stopTokens: Set(manifest.stopTokenIds))
/// for try await event in session.respond(to: "Hello!") {
///     if case .chunk(let text) = event { print(text, terminator: "") }
/// }
/// ```
/// Stopping the loop (or cancelling its task) stops generation after the current token.
public actor ChatSession {
    public let model: any LanguageModel
    public let tokenizer: any Tokenizer
    public let format: ChatFormat?
    public let stopTokens: Set<Int>
    public let systemPrompt: String?
    /// The conversation so far (the system prompt first, if any).
    public private(set) var messages: [ChatMessage] = []
    /// The tokens whose state the model holds, in order.
    public private(set) var cachedTokens: [Int] = []
    private var busy = false

    /// `format` nil: only `generate(prompt:)` works (no chat template).
    public init(model: any LanguageModel, tokenizer: any Tokenizer, format: ChatFormat?,
                stopTokens: Set<Int>, systemPrompt: String? = nil)
    {
        self.model = model
        self.tokenizer = tokenizer
        self.format = format
        self.stopTokens = stopTokens
        self.systemPrompt = systemPrompt
        messages = systemPrompt.map { [.system($0)] } ?? []
    }

    /// Forget the conversation (the system prompt stays) and the model's state.
    public func reset() async throws {
        messages = systemPrompt.map { [.system($0)] } ?? []
        cachedTokens = []
        try await model.resetState()
    }

    /// Add the user's message and stream the reply; the reply (also a cancelled one) joins
    /// the conversation.
    public nonisolated func respond(to text: String, parameters: GenerateParameters = .init())
        -> AsyncThrowingStream<Generation, Error>
    {
        stream { session, continuation in
            try await session.turn(text, parameters, continuation)
        }
    }

    /// Stream a completion of raw token ids (no chat template), reusing the state as a
    /// turn does.
    public nonisolated func generate(prompt: [Int], parameters: GenerateParameters = .init())
        -> AsyncThrowingStream<Generation, Error>
    {
        stream { session, continuation in
            _ = try await session.run(prompt, parameters, continuation)
        }
    }

    private nonisolated func stream(
        _ body: @escaping @Sendable (ChatSession, AsyncThrowingStream<Generation, Error>.Continuation)
            async throws -> Void
    ) -> AsyncThrowingStream<Generation, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    try await body(self, continuation)
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    private func turn(_ text: String, _ parameters: GenerateParameters,
                      _ continuation: AsyncThrowingStream<Generation, Error>.Continuation) async throws
    {
        guard let format else {
            throw EdgertError.chatFormat("the package carries no chat format (manifest before v2)")
        }
        let conversation = messages + [.user(text)]
        let prompt = try format.render(conversation, addGenerationPrompt: true)
        messages = conversation
        let reply = try await run(tokenizer.encode(prompt, addSpecialTokens: false), parameters,
                                  continuation)
        messages.append(.assistant(reply))
    }

    /// The generation loop: reuse the cached prefix, feed the rest of the prompt in chunks,
    /// then sample, stream and feed one token at a time. Returns the text.
    private func run(_ prompt: [Int], _ parameters: GenerateParameters,
                     _ continuation: AsyncThrowingStream<Generation, Error>.Continuation)
        async throws -> String
    {
        guard !busy else { throw EdgertError.busy }
        busy = true
        defer { busy = false }
        guard !prompt.isEmpty else { throw EdgertError.emptyPrompt }
        let info = model.info
        guard prompt.count <= info.contextLength else {
            throw EdgertError.contextFull(needed: prompt.count, context: info.contextLength)
        }

        var keep = zip(cachedTokens, prompt).prefix { $0 == $1 }.count
        keep = min(keep, prompt.count - 1)  // at least one token is fed: its logits are needed
        if !info.canRewind && keep < cachedTokens.count {
            keep = 0
        }
        if keep == 0 && !cachedTokens.isEmpty && !info.canRewind {
            try await model.resetState()
        }
        cachedTokens = Array(prompt[..<keep])

        let clock = ContinuousClock()
        let promptStart = clock.now
        var logits: [Float] = []
        var start = keep
        while start < prompt.count {
            let end = min(start + info.maxChunkLength, prompt.count)
            logits = try await model.logits(for: Array(prompt[start..<end]), at: start)
            cachedTokens += prompt[start..<end]
            start = end
        }
        let promptSeconds = Self.seconds(clock.now - promptStart)

        let generateStart = clock.now
        var sampler = Sampler(parameters.sampling)
        var detokenizer = tokenizer.makeDetokenizer(skipSpecialTokens: false)
        var text = ""
        var generated = 0
        var reason = FinishReason.length
        while generated < parameters.maxTokens {
            if Task.isCancelled {
                reason = .cancelled
                break
            }
            let token = try sampler.next(logits)
            if stopTokens.contains(token) {
                reason = .stop
                break
            }
            generated += 1
            continuation.yield(.token(token))
            let piece = detokenizer.add(token)
            if !piece.isEmpty {
                text += piece
                continuation.yield(.chunk(piece))
            }
            if generated == parameters.maxTokens { break }
            guard cachedTokens.count < info.contextLength else {
                reason = .contextFull
                break
            }
            logits = try await model.logits(for: [token], at: cachedTokens.count)
            cachedTokens.append(token)
        }
        let tail = detokenizer.finish()
        if !tail.isEmpty {
            text += tail
            continuation.yield(.chunk(tail))
        }
        continuation.yield(.info(GenerationInfo(
            promptTokens: prompt.count, reusedTokens: keep, generatedTokens: generated,
            finishReason: reason, promptSeconds: promptSeconds,
            generateSeconds: Self.seconds(clock.now - generateStart))))
        return text
    }

    static func seconds(_ d: Duration) -> Double {
        let (s, attos) = d.components
        return Double(s) + Double(attos) * 1e-18
    }
}
