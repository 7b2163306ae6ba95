"""The mask: a wrapper layer injected into any decoder model, mask files, and the streaming apply."""
