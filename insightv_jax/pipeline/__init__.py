"""The data-generation pipeline (docs/method.md): generate -> assess -> build."""
