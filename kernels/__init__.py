"""C++/CUDA sources of the native tree-scan kernels, shipped as package data of ``grootl.kernels``
(``grootl/kernels`` links here). Compiled on first use by :mod:`grootl.tree.native`."""
