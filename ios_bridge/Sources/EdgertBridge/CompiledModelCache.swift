#if canImport(CoreML)
import CoreML
import CryptoKit
import Foundation

/// Compiled models (`.mlmodelc`) kept between launches, so that a package is compiled once
/// per device and OS version rather than at every start (compiling an 8B package takes
/// minutes and gigabytes). The key is the SHA-256 of the package's manifest, which carries
/// the weights' SHA-256 and every shape, plus the OS version.
public struct CompiledModelCache: Sendable {
    /// Where the compiled models live.
    public let directory: URL

    public init(directory: URL) {
        self.directory = directory
    }

    /// `Library/Caches/edgert-compiled` of the app (the system may purge it: it is rebuilt).
    public static var `default`: CompiledModelCache {
        let caches = FileManager.default.urls(for: .cachesDirectory, in: .userDomainMask)[0]
        return CompiledModelCache(directory: caches.appendingPathComponent("edgert-compiled"))
    }

    /// The cache key of a package: hex SHA-256 over the manifest bytes, the weight file's
    /// size (manifests before v2 carry no weights digest) and the OS version.
    public static func key(for files: PackageFiles) -> String {
        var hasher = SHA256()
        hasher.update(data: files.manifestData)
        let weights = files.package.appendingPathComponent("Data/com.apple.CoreML/weights/weight.bin")
        if let size = (try? FileManager.default.attributesOfItem(atPath: weights.path))?[.size] {
            hasher.update(data: Data("\(size)".utf8))
        }
        hasher.update(data: Data(ProcessInfo.processInfo.operatingSystemVersionString.utf8))
        return hasher.finalize().map { String(format: "%02x", $0) }.joined()
    }

    /// The compiled model of `files.package`: from the cache, or compiled now and stored
    /// (moved into place whole: an interrupted compile leaves no entry behind).
    public func compiledModel(for files: PackageFiles) async throws -> URL {
        let fm = FileManager.default
        let target = directory.appendingPathComponent("\(Self.key(for: files)).mlmodelc")
        if fm.fileExists(atPath: target.path) {
            return target
        }
        let compiled = try await MLModel.compileModel(at: files.package)
        try fm.createDirectory(at: directory, withIntermediateDirectories: true)
        let staging = directory.appendingPathComponent(".\(UUID().uuidString).mlmodelc")
        try fm.moveItem(at: compiled, to: staging)
        do {
            try fm.moveItem(at: staging, to: target)
        } catch {
            try? fm.removeItem(at: staging)
            guard fm.fileExists(atPath: target.path) else { throw error }  // else: stored by another load
        }
        return target
    }

    /// Delete every cached model but `keep` (e.g. after an app update ships a new package).
    public func removeAll(except keep: URL? = nil) throws {
        let fm = FileManager.default
        guard fm.fileExists(atPath: directory.path) else { return }
        for entry in try fm.contentsOfDirectory(at: directory, includingPropertiesForKeys: nil)
        where entry.standardizedFileURL != keep?.standardizedFileURL {
            try fm.removeItem(at: entry)
        }
    }
}
#endif
