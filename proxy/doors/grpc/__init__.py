"""The gRPC door: unary calls and the Session stream."""
