import EdgertCore
import Foundation
import XCTest

struct ReplayFailure: Error, CustomStringConvertible {
    let description: String
}

/// A `LanguageModel` that replays what edgert's Core ML engine (numpy interpreter) fed and
/// got: each token fed must be the one edgert fed at that position, in the same order, and
/// the logits returned are the ones recorded after it.
actor ReplayModel: LanguageModel {
    struct Recording: Decodable {
        struct Call: Decodable {
            let position: Int
            let tokens: [Int]
            let logits: Int
        }
        struct Turn: Decodable {
            let user: String
            let tokens: [Int]
            let text: String
            let finishReason: String
        }
        let vocabSize: Int
        let contextLength: Int
        let maxTokens: Int
        let stopTokenIds: [Int]
        let turns: [Turn]
        let calls: [Call]
    }

    nonisolated let info: ModelInfo
    let steps: [(position: Int, token: Int, logits: Int?)]
    let table: [Float]
    let vocab: Int
    var cursor = 0

    init(_ recording: Recording, logits: [Float], chunk: Int) {
        info = ModelInfo(contextLength: recording.contextLength, vocabularySize: recording.vocabSize,
                         maxChunkLength: chunk, canRewind: true)
        steps = recording.calls.flatMap { call in
            call.tokens.enumerated().map { i, t in
                (call.position + i, t, i == call.tokens.count - 1 ? call.logits : nil)
            }
        }
        table = logits
        vocab = recording.vocabSize
    }

    var remaining: [(position: Int, token: Int, logits: Int?)] { Array(steps[cursor...]) }

    func resetState() throws {
        throw ReplayFailure(description: "edgert never reset the state here")
    }

    func logits(for tokens: [Int], at position: Int) throws -> [Float] {
        var last: Int? = nil
        for (i, token) in tokens.enumerated() {
            guard cursor < steps.count else {
                throw ReplayFailure(description: "fed \(token) at \(position + i) after all edgert fed")
            }
            let step = steps[cursor]
            guard step.position == position + i, step.token == token else {
                throw ReplayFailure(description: "fed \(token) at \(position + i); edgert fed " +
                                    "\(step.token) at \(step.position)")
            }
            cursor += 1
            last = step.logits
        }
        guard let index = last else { return [] }  // no logits recorded here: none needed
        return Array(table[(index * vocab)..<((index + 1) * vocab)])
    }
}

/// A model whose logits always favour token (position % 5) + 10, counting its calls.
actor CountingModel: LanguageModel {
    nonisolated let info: ModelInfo
    var calls: [(tokens: [Int], position: Int)] = []
    var resets = 0

    init(canRewind: Bool) {
        info = ModelInfo(contextLength: 4096, vocabularySize: 32, maxChunkLength: 4,
                         canRewind: canRewind)
    }

    func resetState() { resets += 1 }

    func logits(for tokens: [Int], at position: Int) async throws -> [Float] {
        calls.append((tokens, position))
        try await Task.sleep(nanoseconds: 1_000_000)
        var logits = [Float](repeating: 0, count: 32)
        logits[(position + tokens.count) % 5 + 10] = 1
        return logits
    }
}

/// Text <-> ids for the counting model: each character is its scalar value % 32.
struct CharTokenizer: Tokenizer {
    func encode(_ text: String, addSpecialTokens: Bool) -> [Int] {
        text.unicodeScalars.map { Int($0.value) % 32 }
    }

    func decode(_ tokens: [Int], skipSpecialTokens: Bool) -> String {
        String(tokens.map { Character(Unicode.Scalar(UInt8(65 + $0 % 26))) })
    }

    func makeDetokenizer(skipSpecialTokens: Bool) -> any Detokenizer {
        Chars()
    }

    struct Chars: Detokenizer {
        mutating func add(_ token: Int) -> String { CharTokenizer().decode([token], skipSpecialTokens: false) }
        mutating func finish() -> String { "" }
    }
}

func collect(_ stream: AsyncThrowingStream<Generation, Error>) async throws
    -> (tokens: [Int], text: String, info: GenerationInfo?)
{
    var tokens: [Int] = [], text = "", info: GenerationInfo? = nil
    for try await event in stream {
        switch event {
        case .token(let t): tokens.append(t)
        case .chunk(let s): text += s
        case .info(let i): info = i
        }
    }
    return (tokens, text, info)
}

final class GenerationTests: XCTestCase {
    /// Two chat turns over the recorded logits: the same prompts (chat format + tokenizer),
    /// the same greedy tokens and text as edgert's Python chat session, the second turn
    /// feeding only what follows the shared prefix, ending on a stop token.
    func testReplayMatchesPythonChatSession() async throws {
        let folder = try Fixture.url("EDGERT_TEST_GENERATION")
        let recording = try Fixture.decode(ReplayModel.Recording.self,
                                           folder.appendingPathComponent("replay.json"))
        let data = try Data(contentsOf: folder.appendingPathComponent("logits.bin"))
        let logits = data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        XCTAssertEqual(logits.count, recording.calls.count * recording.vocabSize)

        let manifest = try Fixture.manifest()
        let tokenizer = try BPETokenizer(
            tokenizerJSON: Fixture.manifestFolder().appendingPathComponent(manifest.tokenizerJSON!),
            config: Fixture.manifestFolder().appendingPathComponent("tokenizer/tokenizer_config.json"))
        for chunk in [manifest.prefillMaxLength, 7] {  // chunking is the loop's own business
            let model = ReplayModel(recording, logits: logits, chunk: chunk)
            let session = ChatSession(model: model, tokenizer: tokenizer, format: manifest.chatFormat,
                                      stopTokens: Set(recording.stopTokenIds))
            var infos: [GenerationInfo] = []
            for turn in recording.turns {
                let (tokens, text, info) = try await collect(
                    session.respond(to: turn.user, parameters: GenerateParameters(maxTokens: recording.maxTokens)))
                XCTAssertEqual(tokens, turn.tokens)
                XCTAssertSameText(text, turn.text)
                XCTAssertEqual(info?.finishReason.rawValue, turn.finishReason)
                infos.append(try XCTUnwrap(info))
            }
            XCTAssertEqual(infos[0].reusedTokens, 0)
            XCTAssertGreaterThan(infos[1].reusedTokens, infos[0].promptTokens)  // prompt cache reused
            // all edgert fed, but the stop token it fed ahead at the very end
            let left = await model.remaining
            XCTAssertEqual(left.count, 1)
            XCTAssertTrue(recording.stopTokenIds.contains(left.first?.token ?? -1))
            let messages = await session.messages
            XCTAssertEqual(messages.map(\.role), ["user", "assistant", "user", "assistant"])
            XCTAssertSameText(messages[3].content, recording.turns[1].text)
        }
    }

    func testCancellationStopsGeneration() async throws {
        let model = CountingModel(canRewind: true)
        let session = ChatSession(model: model, tokenizer: CharTokenizer(), format: nil,
                                  stopTokens: [])
        var seen = 0
        for try await event in session.generate(prompt: [1, 2, 3], parameters: GenerateParameters(maxTokens: 10_000)) {
            if case .token = event { seen += 1 }
            if seen == 3 { break }
        }
        try await Task.sleep(nanoseconds: 100_000_000)
        let calls = await model.calls.count
        XCTAssertLessThan(calls, 20, "generation went on after the consumer left")
        // the session is free again
        let (tokens, _, info) = try await collect(session.generate(prompt: [1, 2, 3, 4],
                                                                   parameters: GenerateParameters(maxTokens: 2)))
        XCTAssertEqual(tokens.count, 2)
        XCTAssertEqual(info?.finishReason, .length)
    }

    func testStopTokensChunksAndRewind() async throws {
        let model = CountingModel(canRewind: true)
        let session = ChatSession(model: model, tokenizer: CharTokenizer(), format: nil,
                                  stopTokens: [12])
        // prompt of 9 in chunks of 4: 0..<4, 4..<8, 8..<9; logits favour (9 % 5) + 10 = 14,
        // then 10 (at 10), 11, then 12: a stop token, neither returned nor fed
        let first = try await collect(session.generate(prompt: Array(0..<9)))
        XCTAssertEqual(first.tokens, [14, 10, 11])
        XCTAssertEqual(first.info?.finishReason, .stop)
        var calls = await model.calls
        XCTAssertEqual(calls.map(\.position), [0, 4, 8, 9, 10, 11])
        XCTAssertEqual(calls.map(\.tokens.count), [4, 4, 1, 1, 1, 1])
        // a new prompt sharing 5 tokens: positional states rewind, only the rest is fed
        _ = try await collect(session.generate(prompt: Array(0..<5) + [20, 21],
                                               parameters: GenerateParameters(maxTokens: 1)))
        calls = await model.calls
        XCTAssertEqual(calls[6].position, 5)
        XCTAssertEqual(calls[6].tokens, [20, 21])
        let cached = await session.cachedTokens
        XCTAssertEqual(cached, Array(0..<5) + [20, 21])
    }

    func testRecurrentStatesStartOverInsteadOfRewinding() async throws {
        let model = CountingModel(canRewind: false)
        let session = ChatSession(model: model, tokenizer: CharTokenizer(), format: nil, stopTokens: [])
        _ = try await collect(session.generate(prompt: [1, 2, 3], parameters: GenerateParameters(maxTokens: 2)))
        // extends what the state holds: only the new tokens go in
        _ = try await collect(session.generate(prompt: [1, 2, 3, 13, 9], parameters: GenerateParameters(maxTokens: 1)))
        var calls = await model.calls
        XCTAssertEqual(calls.last?.position, 4)
        // changes an earlier token: the state starts over
        _ = try await collect(session.generate(prompt: [1, 5], parameters: GenerateParameters(maxTokens: 1)))
        calls = await model.calls
        XCTAssertEqual(calls.last?.position, 0)
        let resets = await model.resets
        XCTAssertEqual(resets, 1)
    }

    func testRefusals() async throws {
        let session = ChatSession(model: CountingModel(canRewind: true), tokenizer: CharTokenizer(),
                                  format: nil, stopTokens: [])
        do {
            _ = try await collect(session.generate(prompt: []))
            XCTFail("empty prompt accepted")
        } catch let error as EdgertError {
            XCTAssertEqual(error, .emptyPrompt)
        }
        do {
            _ = try await collect(session.respond(to: "hi"))
            XCTFail("chat without a chat format")
        } catch let error as EdgertError {
            XCTAssertTrue(error.localizedDescription.contains("no chat format"))
        }
    }
}
