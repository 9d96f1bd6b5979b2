"""edgert.ios_bridge: the contract between the Python converter and the Swift package."""
