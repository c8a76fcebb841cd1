# Shared build settings for every UCM distribution that compiles part of the native core.
#
#   include(UcmCore)            # from a distribution's CMakeLists.txt, with cmake/ on CMAKE_MODULE_PATH
#   add_subdirectory(<repo>/csrc csrc)
#   ucm_add_python_module(<name> SOURCES ... DESTINATION <package dir> LINK <targets>)
include_guard(GLOBAL)

get_filename_component(UCM_SOURCE_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

# ---- optional device backends: AUTO (build when the toolkit is found), ON (required), OFF --------
set(UCM_WITH_CUDA AUTO CACHE STRING "Build the CUDA transfer backend (AUTO, ON, OFF)")
set_property(CACHE UCM_WITH_CUDA PROPERTY STRINGS AUTO ON OFF)
set(UCM_WITH_ASCEND AUTO CACHE STRING "Build the Ascend CANN transfer backend (AUTO, ON, OFF)")
set_property(CACHE UCM_WITH_ASCEND PROPERTY STRINGS AUTO ON OFF)

set(UCM_HAVE_CUDA OFF)
if(NOT UCM_WITH_CUDA STREQUAL "OFF")
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
        set(UCM_HAVE_CUDA ON)
        if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
            # Ampere and Hopper machine code, plus Hopper PTX that newer GPUs compile at load time.
            set(CMAKE_CUDA_ARCHITECTURES "80-real;90")
        endif()
        enable_language(CUDA)
    elseif(UCM_WITH_CUDA STREQUAL "ON")
        message(FATAL_ERROR "UCM_WITH_CUDA=ON but no CUDA compiler was found. Install the CUDA toolkit and put "
                            "nvcc on PATH (or set CMAKE_CUDA_COMPILER), or configure with -DUCM_WITH_CUDA=OFF.")
    endif()
endif()

set(UCM_HAVE_ASCEND OFF)
if(NOT UCM_WITH_ASCEND STREQUAL "OFF")
    find_path(UCM_ACL_INCLUDE_DIR acl/acl.h
              HINTS ENV ASCEND_TOOLKIT_HOME ENV ASCEND_HOME_PATH /usr/local/Ascend/ascend-toolkit/latest
              PATH_SUFFIXES include)
    if(UCM_ACL_INCLUDE_DIR)
        set(UCM_HAVE_ASCEND ON)
    elseif(UCM_WITH_ASCEND STREQUAL "ON")
        message(FATAL_ERROR "UCM_WITH_ASCEND=ON but the Ascend CANN toolkit (acl/acl.h) was not found. Install "
                            "CANN and source its set_env.sh (it sets ASCEND_TOOLKIT_HOME), or configure with "
                            "-DUCM_WITH_ASCEND=OFF.")
    endif()
endif()
# ---- TLS for the redis store: AUTO (when OpenSSL's headers are found), ON (required), OFF ----------
set(UCM_WITH_TLS AUTO CACHE STRING "Build TLS support (OpenSSL) into the redis store (AUTO, ON, OFF)")
set_property(CACHE UCM_WITH_TLS PROPERTY STRINGS AUTO ON OFF)
set(UCM_HAVE_TLS OFF)
if(NOT UCM_WITH_TLS STREQUAL "OFF")
    find_package(OpenSSL QUIET)
    if(OPENSSL_FOUND)
        set(UCM_HAVE_TLS ON)
    elseif(UCM_WITH_TLS STREQUAL "ON")
        message(FATAL_ERROR "UCM_WITH_TLS=ON but OpenSSL was not found: install its headers (apt-get install "
                            "libssl-dev), or configure with -DUCM_WITH_TLS=OFF.")
    endif()
endif()

message(STATUS "UCM backends: CUDA=${UCM_HAVE_CUDA} (UCM_WITH_CUDA=${UCM_WITH_CUDA}), "
               "Ascend=${UCM_HAVE_ASCEND} (UCM_WITH_ASCEND=${UCM_WITH_ASCEND}), "
               "TLS=${UCM_HAVE_TLS} (UCM_WITH_TLS=${UCM_WITH_TLS})")

# ---- settings every native target links to -------------------------------------------------------
find_package(Threads REQUIRED)
if(NOT TARGET ucm_settings)
    add_library(ucm_settings INTERFACE)
    target_compile_features(ucm_settings INTERFACE cxx_std_17)
    target_compile_options(ucm_settings INTERFACE
        $<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang>:-Wall -Wextra -Wno-unused-parameter>)
    target_link_libraries(ucm_settings INTERFACE Threads::Threads)
endif()

# ucm_add_python_module(<name> SOURCES <files> DESTINATION <dir inside the wheel> [LINK <targets>])
function(ucm_add_python_module name)
    cmake_parse_arguments(ARG "" "DESTINATION" "SOURCES;LINK" ${ARGN})
    pybind11_add_module(${name} MODULE ${ARG_SOURCES})
    target_link_libraries(${name} PRIVATE ucm_settings ${ARG_LINK})
    set_target_properties(${name} PROPERTIES
        CXX_VISIBILITY_PRESET hidden
        VISIBILITY_INLINES_HIDDEN ON
        INSTALL_RPATH "$ORIGIN")
    install(TARGETS ${name} LIBRARY DESTINATION ${ARG_DESTINATION})
endfunction()
