"""The `make demo` miniature: procedural toy videos, a tiny Wan-architecture teacher trained on
them, and metrics that measure how close generated clips come to the data (precision) and how
much of it they reach (coverage). Distillation itself uses the project's own trainer."""
