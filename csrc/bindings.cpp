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
  m.def("cpu_isas", &neuraldb::cpu_isas, "CPU kernels this machine can run, best first (the option isa picks one)");
  // The options travel as keywords so that Python names each knob (neuraldb_kernels.config sets them).
  m.def(
      "set_cpu_options",
      [](const std::string& isa, int64_t chunk, double parallel_min_us, int64_t amx_min_t, int64_t amx_cap,
         int64_t amx_tight, int64_t amx_blocks, bool debug) {
        neuraldb::CpuOptions o;
        o.isa = isa;
        o.chunk = chunk;
        o.parallel_min_us = parallel_min_us;
        o.amx_min_t = amx_min_t;
        o.amx_cap = amx_cap;
        o.amx_tight = amx_tight;
        o.amx_blocks = amx_blocks;
        o.debug = debug;
        neuraldb::set_cpu_options(o);
      },
      "Sets the CPU kernels' options for every later call", pybind11::kw_only(), pybind11::arg("isa"),
      pybind11::arg("chunk"), pybind11::arg("parallel_min_us"), pybind11::arg("amx_min_t"), pybind11::arg("amx_cap"),
      pybind11::arg("amx_tight"), pybind11::arg("amx_blocks"), pybind11::arg("debug"));
  m.def(
      "cpu_options",
      [] {
        const neuraldb::CpuOptions o = neuraldb::cpu_options();
        pybind11::dict d;
        d["isa"] = o.isa;
        d["chunk"] = o.chunk;
        d["parallel_min_us"] = o.parallel_min_us;
        d["amx_min_t"] = o.amx_min_t;
        d["amx_cap"] = o.amx_cap;
        d["amx_tight"] = o.amx_tight;
        d["amx_blocks"] = o.amx_blocks;
        d["debug"] = o.debug;
        return d;
      },
      "The CPU kernels' current options, as a dict");
#ifdef NEURALDB_WITH_CUDA
  m.def("gated_retrieval_cuda", &neuraldb::gated_retrieval_cuda, "Fused gated retrieval on CUDA",
        pybind11::arg("queries"), pybind11::arg("keys"), pybind11::arg("values"), pybind11::arg("gamma"));
#endif
}
