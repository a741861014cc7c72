"""Teachers write instruction data from symbolic contexts (never from pixels)."""
