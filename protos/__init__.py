"""gRPC protocol sources and generated stubs (land with issue 6)."""
