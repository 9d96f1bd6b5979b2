import EdgertCore
import Foundation
import XCTest

final class ChatFormatTests: XCTestCase {
    struct Entry: Decodable {
        struct Conversation: Decodable {
            let messages: [ChatMessage]
            let addGenerationPrompt: Bool
            let rendered: String?
        }
        let name: String
        let chatFormat: ChatFormat
        let conversations: [Conversation]
    }

    /// Rendering from the manifest's reduced format equals jinja2's rendering of the model's
    /// own template; conversations the format cannot express (a role the template moves or
    /// refuses) and unreducible templates are refused, never guessed.
    func testRenderingEqualsJinja() throws {
        let entries = try Fixture.decode([Entry].self, Fixture.url("EDGERT_TEST_CHAT"))
        XCTAssertEqual(Set(entries.map(\.name)),
                       ["package", "llama3", "mistral", "gemma", "conditional", "last_user_differs",
                        "dated"])
        var compared = 0
        for entry in entries {
            let fmt = entry.chatFormat
            for c in entry.conversations {
                let ours = try? fmt.render(c.messages, addGenerationPrompt: c.addGenerationPrompt)
                let label = "\(entry.name) \(c.messages.map(\.role))"
                if fmt.type == "unsupported" {
                    XCTAssertNil(ours, label)
                    continue
                }
                let roles = Set(fmt.roles?.map(\.role) ?? [])
                let expressible = c.messages.allSatisfy { roles.contains($0.role) }
                    && (fmt.systemAnywhere == true
                        || !c.messages.dropFirst().contains { $0.role == "system" })
                if let expected = c.rendered, expressible {
                    XCTAssertSameText(try XCTUnwrap(ours, label), expected, label)
                    compared += 1
                } else if !expressible {
                    XCTAssertNil(ours, "\(label): rendered a conversation the format lacks")
                }
            }
        }
        XCTAssertGreaterThan(compared, 15)
    }

    func testPackageFormatIsTheManifests() throws {
        let fmt = try XCTUnwrap(Fixture.manifest().chatFormat)
        let text = try fmt.render([.user("Hi")])
        XCTAssertSameText(text, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, " +
                          "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" +
                          "<|im_start|>assistant\n")
    }

    func testUnsupportedFormatSaysWhy() throws {
        let json = #"{"type": "unsupported", "reason": "conditions on content"}"#
        let fmt = try JSONDecoder().decode(ChatFormat.self, from: Data(json.utf8))
        XCTAssertThrowsError(try fmt.render([.user("x")])) { error in
            XCTAssertEqual(error as? EdgertError, .chatFormat("conditions on content"))
        }
    }
}
