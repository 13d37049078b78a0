"""The bottom layer: number formats, packing, pure quantization maths, input checks, errors, target
selection and memory accounting. Imports nothing else from llmopt."""
