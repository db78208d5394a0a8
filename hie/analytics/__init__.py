"""hie.analytics: built by a later issue (see DESIGN.md roadmap)."""
