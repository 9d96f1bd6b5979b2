// Signatures of the Core ML API the bridge uses (iOS 18 SDK), bodies empty: type-checking only.
import Foundation
public enum MLComputeUnits: Int, Sendable { case cpuOnly, cpuAndGPU, all, cpuAndNeuralEngine }
open class MLModelConfiguration: NSObject { public override init() {}; open var computeUnits: MLComputeUnits = .all; open var functionName: String? }
open class MLState: NSObject {}
public protocol MLFeatureProvider { func featureValue(for featureName: String) -> MLFeatureValue? }
open class MLFeatureValue: NSObject { public init(multiArray: MLMultiArray) {}; open var multiArrayValue: MLMultiArray? { nil } }
open class MLDictionaryFeatureProvider: NSObject, MLFeatureProvider { public init(dictionary: [String: Any]) throws {}; open func featureValue(for featureName: String) -> MLFeatureValue? { nil } }
public enum MLMultiArrayDataType: Int, Sendable { case int32, float16, float32 }
open class MLMultiArray: NSObject {
    public init(shape: [NSNumber], dataType: MLMultiArrayDataType) throws {}
    open var shape: [NSNumber] { [] }
    open var strides: [NSNumber] { [] }
    open func withUnsafeMutableBufferPointer<S, R>(ofType type: S.Type, _ body: (UnsafeMutableBufferPointer<S>, [Int]) throws -> R) rethrows -> R { fatalError() }
    open func withUnsafeBufferPointer<S, R>(ofType type: S.Type, _ body: (UnsafeBufferPointer<S>) throws -> R) rethrows -> R { fatalError() }
    open func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer, [Int]) throws -> R) rethrows -> R { fatalError() }
}
open class MLModel: NSObject {
    open class func compileModel(at modelURL: URL) async throws -> URL { fatalError() }
    open class func load(contentsOf url: URL, configuration: MLModelConfiguration = MLModelConfiguration()) async throws -> MLModel { fatalError() }
    open func makeState() -> MLState { fatalError() }
    open func prediction(from input: MLFeatureProvider, using state: MLState) throws -> MLFeatureProvider { fatalError() }
}
