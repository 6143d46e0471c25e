// Python bindings of neuraldb_kernels._C (setup.py builds this file; CMake builds the kernels without it).
#include <torch/extension.h>

#include "gated_retrieval.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "neuraldb gated-retrieval kernels";
  m.def("gated_retrieval_cpu", &neuraldb::gated_retrieval_cpu, "Fused gated retrieval on CPU (fp32 accumulation)",
        pybind11::arg("queries"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("gamma"));
  m.def("gated_retrieval_prefiltered_cpu", &neuraldb::gated_retrieval_prefiltered_cpu,
        "Fused gated retrieval on CPU behind the exact int4 sketch pre-filter", pybind11::arg("queries"),
        pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("gamma"), pybind11::arg("sketch"),
        pybind11::arg("signs") = pybind11::none());
  m.def("gated_residuals_cpu", &neuraldb::gated_residuals_cpu,
        "The gated residuals of queries (..., d1) (pre-filtered when a sketch is given and there are at most "
        "sketch_max_rows rows), or None when no row's gate opens",
        pybind11::arg("queries"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("gamma"),
        pybind11::arg("sketch") = pybind11::none(), pybind11::arg("signs") = pybind11::none(),
        pybind11::arg("sketch_max_rows") = 0);
  m.def("cpu_isas", &neuraldb::cpu_isas, "CPU kernels this machine can run, best first (NEURALDB_CPU_ISA picks one)");
  m.def("read_probe", &neuraldb::read_probe, "Reads a CPU tensor once (benchmark bandwidth probe); returns a checksum",
        pybind11::arg("tensor"));
#ifdef NEURALDB_WITH_CUDA
  m.def("gated_retrieval_cuda", &neuraldb::gated_retrieval_cuda, "Fused gated retrieval on CUDA",
        pybind11::arg("queries"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("gamma"));
#endif
}
