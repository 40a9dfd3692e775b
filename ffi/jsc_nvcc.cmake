# Finding nvcc and deciding whether it can build the CUDA kernels (included by
# CMakeLists.txt; also runs in script mode for tests/kernels/test_cuda_support.py:
#   cmake -DJSC_CUDA=AUTO -DJSC_NVCC_CANDIDATE=/path/to/nvcc -P jsc_nvcc.cmake
# prints "JSC_NVCC_RESULT=<nvcc or empty>;<version>;<why>").
#
# Where nvcc is looked for, in order: CMAKE_CUDA_COMPILER / $CUDACXX (CMake's own), PATH,
# $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin (where NVIDIA's toolkit installs, not on
# PATH by default). Note: the jax[cuda12] / jax[cuda13] wheels bring no nvcc; without a
# toolkit the CUDA kernels are not built and jax_sparseconv warns on GPUs that the jnp path
# serves them (backend.cuda_status).
#
# The kernels need nvcc >= JSC_MIN_NVCC_VERSION (12.8: the oldest toolkit they are written
# and checked for; CUDA 12.8 is also the first to know the architectures of the GPUs that
# sm_90 PTX must be JIT-compiled for). An older nvcc: with JSC_CUDA=AUTO the CUDA kernels are
# skipped (the install succeeds with the host build); with JSC_CUDA=ON the build fails.
set(JSC_MIN_NVCC_VERSION "12.8")

# jsc_nvcc_version(<nvcc> <out>): "12.4" from `nvcc --version` ("release 12.4, V12.4.131"),
# empty when it does not run or says no release.
function(jsc_nvcc_version nvcc out)
  execute_process(COMMAND "${nvcc}" --version OUTPUT_VARIABLE text ERROR_QUIET
                  RESULT_VARIABLE rc)
  set(version "")
  if(rc EQUAL 0 AND text MATCHES "release ([0-9]+)\\.([0-9]+)")
    set(version "${CMAKE_MATCH_1}.${CMAKE_MATCH_2}")
  endif()
  set(${out} "${version}" PARENT_SCOPE)
endfunction()

# jsc_find_nvcc(<candidate> <out_nvcc> <out_version> <out_why>): the nvcc to use (empty:
# build no CUDA kernels), its version and a sentence for the log. `candidate`: an nvcc
# already named (CMAKE_CUDA_COMPILER or $CUDACXX), or empty. Fails the configuration where
# JSC_CUDA=ON cannot be honoured.
function(jsc_find_nvcc candidate out_nvcc out_version out_why)
  set(nvcc "${candidate}")
  if(NOT nvcc)
    find_program(JSC_NVCC_ON_PATH nvcc)
    set(nvcc "${JSC_NVCC_ON_PATH}")
  endif()
  if(NOT nvcc)
    find_program(JSC_NVCC_TOOLKIT nvcc NO_DEFAULT_PATH
                 PATHS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin)
    set(nvcc "${JSC_NVCC_TOOLKIT}")
  endif()
  set(version "")
  if(NOT nvcc)
    set(why "nvcc not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin)")
  else()
    jsc_nvcc_version("${nvcc}" version)
    if(version STREQUAL "")
      set(why "${nvcc} does not report its version")
      set(nvcc "")
    elseif(version VERSION_LESS JSC_MIN_NVCC_VERSION)
      set(why "${nvcc} is CUDA ${version}; the kernels need nvcc >= ${JSC_MIN_NVCC_VERSION}")
      set(nvcc "")
    else()
      set(why "${nvcc} (CUDA ${version})")
    endif()
  endif()
  if(NOT nvcc AND JSC_CUDA STREQUAL "ON")
    message(FATAL_ERROR "JSC_CUDA=ON, but no usable CUDA compiler: ${why}")
  endif()
  set(${out_nvcc} "${nvcc}" PARENT_SCOPE)
  set(${out_version} "${version}" PARENT_SCOPE)
  set(${out_why} "${why}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  jsc_find_nvcc("${JSC_NVCC_CANDIDATE}" nvcc version why)
  message("JSC_NVCC_RESULT=${nvcc};${version};${why}")
endif()
