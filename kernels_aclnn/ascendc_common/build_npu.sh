#!/bin/bash
# Builds and installs the four AscendC ops (LightningDecode, LightningPrefill, InfllmBlockSelect,
# InfllmSparseAttention) on a machine with CANN, through MindSpore's bundled custom-op compiler
# (lib/plugin/ascend/custom_compiler/setup.py, which wraps CANN's op-project build.sh). That tool
# takes one flat op_host and one flat op_kernel folder, so the ops' folders and the shared
# headers are staged into one of each first (the headers include each other by bare name).
#   bash kernels_aclnn/ascendc_common/build_npu.sh <install_path> [soc_version, default ascend910b]
# then: export ASCEND_CUSTOM_OPP_PATH=<install_path>/vendors/customize:$ASCEND_CUSTOM_OPP_PATH
set -euo pipefail
install_path=$(realpath -m "${1:?usage: build_npu.sh <install_path> [soc_version]}")
soc=${2:-ascend910b}
here=$(cd "$(dirname "$0")/.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/op_host" "$stage/op_kernel"
common=(hw_910b.h tiling_common.h)
for op in lightning_attention infllm_score infllm_attention; do
  cp "$here/$op"/op_host/*.{h,cpp} "$stage/op_host/"
  cp "$here/$op"/op_kernel/*.{h,cpp} "$here/$op"/op_host/*_tiling.h "$stage/op_kernel/"
done
for f in "${common[@]}" op_host_common.h; do cp "$here/ascendc_common/$f" "$stage/op_host/"; done
for f in "${common[@]}" kernel_helpers.h ascendc_layer.h; do cp "$here/ascendc_common/$f" "$stage/op_kernel/"; done
compiler=$(python -c "import mindspore, os; print(os.path.join(os.path.dirname(mindspore.__file__), 'lib/plugin/ascend/custom_compiler'))")
cd "$compiler"  # setup.py runs start.sh from its own folder
python setup.py -o "$stage/op_host" -k "$stage/op_kernel" --soc_version "$soc" --install_path "$install_path"
