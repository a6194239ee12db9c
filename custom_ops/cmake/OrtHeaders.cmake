# Locates the ONNX Runtime C/C++ headers for the op library and sets ORT_INCLUDE_DIR.
#
# The onnxruntime pip wheels ship the shared library but no headers, so by default the
# headers are taken from Debian's libonnxruntime-dev package (ONNX Runtime 1.21). The C API
# is append-only, so a library compiled against 1.21 headers loads in any newer runtime; the
# library negotiates the API version at load time (register.cc). The .deb is pinned by
# SHA-256 (it is data only: the amd64 package serves every host architecture) and extracted
# once into the build directory, so rebuilds do not download again.
#
# Override: -DONNXRUNTIME_INCLUDE_DIR=/path or the environment variable of the same name,
# pointing at a folder that holds onnxruntime_cxx_api.h (e.g. an ONNX Runtime release's
# include/ folder, 1.17 or newer).

set(_ORT_DEB_NAME "libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb")
set(_ORT_DEB_SHA256 "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
# The pool keeps a file while trixie carries that version; snapshot.debian.org keeps every
# file Debian ever published, addressed by its SHA-1.
set(_ORT_DEB_URLS
    "https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0%2bdfsg-1_amd64.deb"
    "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0%2bdfsg-1_amd64.deb"
    "https://snapshot.debian.org/file/24211608c53cf623c58ab2b2f9d4157ed06b3a76")

set(ONNXRUNTIME_INCLUDE_DIR "" CACHE PATH
    "Folder holding onnxruntime_cxx_api.h; empty: the environment variable of that name, else Debian's headers")
# Read the environment on every configure (not only the first), so that a build folder kept
# between editable rebuilds follows the variable.
set(_ort_user_dir "${ONNXRUNTIME_INCLUDE_DIR}")
if(NOT _ort_user_dir)
  set(_ort_user_dir "$ENV{ONNXRUNTIME_INCLUDE_DIR}")
endif()

# _ort_check_headers(<dir> <out-var>): TRUE when <dir> holds the headers the library includes.
function(_ort_check_headers dir out)
  set(ok TRUE)
  foreach(header onnxruntime_c_api.h onnxruntime_cxx_api.h onnxruntime_cxx_inline.h)
    if(NOT EXISTS "${dir}/${header}")
      set(ok FALSE)
    endif()
  endforeach()
  set(${out} ${ok} PARENT_SCOPE)
endfunction()

# _ort_fetch_debian_headers(<dest> <out-var>): downloads and unpacks the pinned .deb into
# <dest>; <out-var> gets the include folder, or an error description prefixed with "ERROR:".
function(_ort_fetch_debian_headers dest out)
  set(include_dir "${dest}/usr/include/onnxruntime")
  _ort_check_headers("${include_dir}" cached)
  if(cached)
    set(${out} "${include_dir}" PARENT_SCOPE)
    return()
  endif()
  set(deb "${dest}/${_ORT_DEB_NAME}")
  set(errors "")
  foreach(url IN LISTS _ORT_DEB_URLS)
    message(STATUS "fptq_ops: downloading ONNX Runtime headers from ${url}")
    # The hash is checked here rather than with EXPECTED_HASH, which turns a failed attempt
    # into a configure error even when a later address would work.
    file(DOWNLOAD "${url}" "${deb}" TIMEOUT 120 STATUS status)
    list(GET status 0 code)
    list(GET status 1 reason)
    if(code EQUAL 0)
      file(SHA256 "${deb}" sha256)
      if(sha256 STREQUAL _ORT_DEB_SHA256)
        break()
      endif()
      set(reason "SHA-256 ${sha256}, expected ${_ORT_DEB_SHA256}")
    endif()
    string(APPEND errors "\n  ${url}: ${reason}")
    file(REMOVE "${deb}")
  endforeach()
  if(NOT EXISTS "${deb}")
    set(${out} "ERROR: could not download ${_ORT_DEB_NAME}:${errors}" PARENT_SCOPE)
    return()
  endif()
  # A .deb is an ar archive holding data.tar.*; CMake's libarchive reads both formats, so no
  # dpkg or ar is needed on the build machine.
  set(unpack "${dest}/deb")
  file(REMOVE_RECURSE "${unpack}")
  file(ARCHIVE_EXTRACT INPUT "${deb}" DESTINATION "${unpack}")
  file(GLOB data_tar "${unpack}/data.tar*")
  if(NOT data_tar)
    set(${out} "ERROR: ${deb} holds no data.tar.*" PARENT_SCOPE)
    return()
  endif()
  file(ARCHIVE_EXTRACT INPUT "${data_tar}" DESTINATION "${dest}" PATTERNS "usr/include/onnxruntime*")
  file(REMOVE_RECURSE "${unpack}")
  _ort_check_headers("${include_dir}" ok)
  if(NOT ok)
    set(${out} "ERROR: ${deb} did not contain the expected headers" PARENT_SCOPE)
    return()
  endif()
  set(${out} "${include_dir}" PARENT_SCOPE)
endfunction()

if(_ort_user_dir)
  _ort_check_headers("${_ort_user_dir}" ok)
  if(NOT ok)
    message(FATAL_ERROR
      "ONNXRUNTIME_INCLUDE_DIR='${_ort_user_dir}' does not contain onnxruntime_c_api.h, "
      "onnxruntime_cxx_api.h and onnxruntime_cxx_inline.h. Point it at an ONNX Runtime include/ "
      "folder (1.17 or newer), or unset it to download the headers from Debian.")
  endif()
  set(ORT_INCLUDE_DIR "${_ort_user_dir}")
else()
  _ort_fetch_debian_headers("${CMAKE_BINARY_DIR}/ort-headers" ORT_INCLUDE_DIR)
  if(ORT_INCLUDE_DIR MATCHES "^ERROR: ")
    message(FATAL_ERROR
      "fptq_ops needs the ONNX Runtime C/C++ headers (the onnxruntime wheel has none).\n"
      "${ORT_INCLUDE_DIR}\n"
      "Fix: give a folder that holds onnxruntime_cxx_api.h, e.g.\n"
      "  ONNXRUNTIME_INCLUDE_DIR=/usr/include/onnxruntime pip install ...\n"
      "(apt install libonnxruntime-dev, or unpack include/ from an ONNX Runtime release archive "
      "from github.com/microsoft/onnxruntime/releases).")
  endif()
endif()
message(STATUS "fptq_ops: ONNX Runtime headers: ${ORT_INCLUDE_DIR}")
