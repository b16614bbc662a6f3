"""Interoperability with the Hugging Face ecosystem: config.json and safetensors weights, both directions."""
