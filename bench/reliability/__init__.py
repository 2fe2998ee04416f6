"""Reliability at scale: fuzzed adapter files, hostile uploads, the app soak."""
