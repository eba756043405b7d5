"""Prompt templates shared by models, tasks and the mini LM's corpus (one place each)."""

# Zero-shot VQA (method.md section 6; BLIP-2's prompt): the question goes in the braces.
VQA_PROMPT = "Question: {} Short answer:"
