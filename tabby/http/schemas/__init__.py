"""Request and response schemas of the HTTP API, as attrs classes.

Handlers validate bodies with these classes and the OpenAPI document is generated from
the same classes, so every field carries ``metadata={"doc": ...}``.
"""
