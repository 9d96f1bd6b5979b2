// The Core ML half of the bridge re-exports the platform-independent core, so that an app
// imports one module: `import EdgertBridge`.
@_exported import EdgertCore
