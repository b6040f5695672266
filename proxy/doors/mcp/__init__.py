"""The MCP door: Streamable HTTP and stdio, tools and resources."""
