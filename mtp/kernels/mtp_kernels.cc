// The kernels' one translation unit (one thread pool, shared helpers): the products and attention,
// then the fused decode layer built on them.
#include "rows_matmul.cc"
#include "decode_layer.cc"
