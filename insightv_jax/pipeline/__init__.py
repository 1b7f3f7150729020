"""The data-generation pipeline (METHOD.md §1–3): generate -> assess -> build."""
