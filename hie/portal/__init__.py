"""hie.portal: built by a later issue (see DESIGN.md roadmap)."""
