"""hie.registries: built by a later issue (see DESIGN.md roadmap)."""
