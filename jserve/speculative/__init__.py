"""Speculative decoding: proposers and the on-device verification."""
