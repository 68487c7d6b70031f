"""vxnet benchmarks: vxnet against Docker's built-in overlay (and the plain underlay) on simulated hosts.

    python3 -m bench [--parts datapath,convergence,startup] [...]   (see --help; `make bench`)

Numbers are printed as ratios against the built-in overlay measured in the same run: this machine is noisy,
absolute figures mean little. Nothing here is asserted by the tests.
"""
