"""Image quality on ``builtin:toy``: one concept alone, several fused, multi-concept layouts."""
