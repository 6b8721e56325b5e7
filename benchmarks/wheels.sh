# Sourced by benchmarks/gpu_check.sh and gpu_verify.sh, from the project root. Nothing is downloaded: on a machine
# without pytorchcv or pyhocon, put their wheels (and pyparsing's) in .whl/ beside benchmarks/ (docs/speed.md, GPU);
# they are installed into a temporary folder, which goes on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/granq_site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
