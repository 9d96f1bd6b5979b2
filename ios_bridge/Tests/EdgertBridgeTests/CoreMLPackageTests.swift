#if canImport(CoreML)
import CoreML
import EdgertBridge
import Foundation
import XCTest

/// On a Mac (macOS 15+), with the fixtures tests/test_ios_bridge.py writes: the exported
/// package through Core ML itself gives the greedy tokens edgert's numpy interpreter gave,
/// up to the first near-tie of the recorded logits (fp16 arithmetic differs by device), and
/// the second load reuses the compiled model.
final class CoreMLPackageTests: XCTestCase {
    struct Recording: Decodable {
        struct Call: Decodable {
            let position: Int
            let tokens: [Int]
            let logits: Int
        }
        struct Turn: Decodable {
            let user: String
            let tokens: [Int]
        }
        let vocabSize: Int
        let maxTokens: Int
        let stopTokenIds: [Int]
        let turns: [Turn]
        let calls: [Call]
    }

    func testFirstTurnMatchesTheInterpreter() async throws {
        let env = ProcessInfo.processInfo.environment
        guard let pkg = env["EDGERT_TEST_PACKAGE"], let gen = env["EDGERT_TEST_GENERATION"] else {
            throw XCTSkip("set EDGERT_TEST_PACKAGE and EDGERT_TEST_GENERATION (tests/test_ios_bridge.py does)")
        }
        let folder = URL(fileURLWithPath: gen)
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let recording = try decoder.decode(Recording.self,
                                           from: Data(contentsOf: folder.appendingPathComponent("replay.json")))
        let table = try Data(contentsOf: folder.appendingPathComponent("logits.bin"))
            .withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }

        let cache = CompiledModelCache(directory: FileManager.default.temporaryDirectory
            .appendingPathComponent("edgert-test-\(UUID().uuidString)"))
        defer { try? FileManager.default.removeItem(at: cache.directory) }
        let clock = ContinuousClock()
        var start = clock.now
        let package = try await EdgertPackage.load(URL(fileURLWithPath: pkg), computeUnits: .cpuAndGPU,
                                                   cache: cache)
        let firstLoad = clock.now - start
        start = clock.now
        _ = try await EdgertPackage.load(URL(fileURLWithPath: pkg), computeUnits: .cpuAndGPU, cache: cache)
        print("load: \(firstLoad) compiling, \(clock.now - start) from the cache")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: cache.directory.path).count, 1)

        let session = ChatSession(model: package.model, tokenizer: package.tokenizer,
                                  format: package.manifest.chatFormat,
                                  stopTokens: Set(recording.stopTokenIds))
        var tokens: [Int] = []
        var promptTokens = 0
        for try await event in session.respond(to: recording.turns[0].user,
                                               parameters: GenerateParameters(maxTokens: recording.maxTokens)) {
            if case .token(let t) = event { tokens.append(t) }
            if case .info(let info) = event {
                promptTokens = info.promptTokens
                print("Core ML: \(info.tokensPerSecond) tok/s, prompt \(info.promptTokensPerSecond) tok/s")
            }
        }
        let expected = recording.turns[0].tokens
        print("Core ML tokens \(tokens)\ninterpreter    \(expected)")
        for (k, token) in expected.enumerated() {
            // the logits that chose token k: the call ending at position promptTokens - 1 + k
            guard let call = recording.calls.first(where: {
                $0.position + $0.tokens.count == promptTokens + k
            }) else { break }
            let row = table[(call.logits * recording.vocabSize)..<((call.logits + 1) * recording.vocabSize)]
            let sorted = row.sorted(by: >)
            if sorted[0] - sorted[1] < 0.1 { break }  // a near tie: fp16 may go either way
            XCTAssertEqual(tokens.count > k ? tokens[k] : -1, token, "token \(k)")
        }
    }
}
#endif
