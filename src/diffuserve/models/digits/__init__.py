"""The built-in `digits` model: a tiny FLUX trained on scikit-learn's handwritten digits, with its evaluation."""
