"""Built-in models: architectures the project builds itself and the trained weights it ships."""
