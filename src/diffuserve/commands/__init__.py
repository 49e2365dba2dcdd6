"""Sub-commands of the `diffuserve` CLI, one module each."""
