import EdgertCore
import Foundation
import XCTest

/// The files tests/test_ios_bridge.py writes and names in environment variables. Run alone
/// (`swift test` without them), the tests that need them skip; under pytest none may skip.
enum Fixture {
    static func url(_ variable: String) throws -> URL {
        guard let path = ProcessInfo.processInfo.environment[variable] else {
            throw XCTSkip("set \(variable) (tests/test_ios_bridge.py does)")
        }
        return URL(fileURLWithPath: path)
    }

    static func decode<T: Decodable>(_ type: T.Type, _ url: URL) throws -> T {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try decoder.decode(type, from: Data(contentsOf: url))
    }

    /// The exported package's manifest folder (Data/com.edgert).
    static func manifestFolder() throws -> URL {
        PackageLayout.itemFolder.reduce(try url("EDGERT_TEST_PACKAGE")) {
            $0.appendingPathComponent($1)
        }
    }

    static func manifest() throws -> Manifest {
        try Manifest.load(contentsOf: manifestFolder().appendingPathComponent(PackageLayout.manifestFile))
    }
}

/// Strings compared byte for byte (Swift's == treats canonically equivalent text as equal).
func XCTAssertSameText(_ a: String, _ b: String, _ message: @autoclosure () -> String = "",
                       file: StaticString = #filePath, line: UInt = #line)
{
    if !a.utf8.elementsEqual(b.utf8) {
        XCTFail("\(a.debugDescription) != \(b.debugDescription) \(message())", file: file, line: line)
    }
}
