"""The `vxnet` command for operators (status, doctor, gc, keys): cli/main.py."""
