"""hie.lab_exchange: built by a later issue (see DESIGN.md roadmap)."""
