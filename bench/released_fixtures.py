"""bench/released_fixtures.py: small stand-ins for DeepMind's released BYOL checkpoints, written
the way the official code writes the real ones (its Checkpointer: dill.dump(dict(experiment_state,
step, rng), f, protocol=2); ../shared/SPEC.md section 10), so that the tests read the real format
without dill installed. Each file is committed xz-compressed under bench/released_fixtures/.

    pip install --target /tmp/dill033 dill==0.3.3     # the dill of 2020, when the files were made
    pip install --target /tmp/dill041 dill==0.4.1     # a current one
    PYTHONPATH=/tmp/dill033 python bench/released_fixtures.py
    PYTHONPATH=/tmp/dill041 python bench/released_fixtures.py

What is in them, as in the real files: experiment_state, a _ByolExperimentState NamedTuple of
module byol.byol_experiment (dill writes its class with _create_namedtuple); the online
parameters and BN averages of a ResNet-50 of the real shapes under Haiku's keys, a classifier of
N_CLASSES classes (the tests' image folder has 4), the projector and predictor; an optimizer
state of optax-style NamedTuples (AddWeightDecayState, ScaleByLarsState, optax's EmptyState);
step 312,784, the step the official loop saves last for 1000 epochs at batch 4096; numpy arrays
written through dill's helpers (dill 0.3.x reaches numpy's _reconstruct and _codecs.encode through
_get_attr and _import_module; dill 0.4.x names them and wraps each array in _create_array).
The two files differ as the JAX stack did: dill 0.3.x's holds older Haiku's FlatMapping (a dict
subclass) as every mapping and rng as a numpy array (as JAX's DeviceArray of 2020 pickled);
dill 0.4.x's holds plain dicts (newer Haiku) and rng as a jax array (rebuilt by a function of
jax._src.array, a stand-in here). numpy's functions carry the module names of the numpy that
writes them (numpy._core for numpy 2; the files of 2020 name numpy.core; the reader takes both).
Each file is read back by dill itself before it is saved.

What differs, to keep them small: the target network, the momentum and the projector and
predictor are smaller than the real ones (the readers skip them; their layout is the same), and
every array's values repeat with a period of PERIOD numbers (the same draws in every array, each
starting where the previous one stopped), which xz stores in a few bytes per repeat: 0.25 MB for
the 142 MB pickle. The convolutions' values are standard normal and the BN variances carry the
fan-in, so that the features stay of order one through the 16 blocks.
"""
import lzma
import math
import pickletools
import sys
import types
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

OUT = Path(__file__).resolve().parent / 'released_fixtures'
N_CLASSES = 4
PERIOD = 8191                     # a prime, so the repeats fall across channels and taps
RELEASED_STEP = 1000 * 1281167 // 4096  # 312,784: 1000 epochs of ImageNet at batch 4096
RESNET50_BLOCKS, RESNET50_CHANNELS = (3, 4, 6, 3), (256, 512, 1024, 2048)


def fixture_arrays(n_classes=N_CLASSES, seed=0):
    """The online parameters and BN averages of a ResNet-50 (real shapes, Haiku's keys), the
    classifier and narrow projector and predictor: two dicts {module path: {name: float32
    array}} (params, state), every array's values periodic (PERIOD)."""
    pool = np.random.default_rng(seed).standard_normal(PERIOD).astype(np.float32)
    used = 0

    def draw(*shape):  # the next values of the periodic sequence
        nonlocal used
        n = math.prod(shape)
        out = pool[(used + np.arange(n)) % PERIOD].reshape(shape)
        used += n
        return out

    params, state = {}, {}

    def conv(name, k, cin, cout):
        params[name] = {'w': draw(k, k, cin, cout)}                  # HWIO, standard normal
        return k * k * cin

    def bn(name, c, fan_in):
        params[name] = {'scale': 1 + 0.2 * draw(1, 1, 1, c), 'offset': 0.1 * draw(1, 1, 1, c)}
        for ema, value in (('mean_ema', 0.1 * draw(1, 1, 1, c)),
                           ('var_ema', fan_in * (1 + 0.5 * np.abs(draw(1, 1, 1, c))))):
            state[f'{name}/~/{ema}'] = {'counter': np.array(312_784, np.int32),
                                        'hidden': value.copy(), 'average': value}

    scope = 'res_net50/~/'
    bn(scope + 'initial_batchnorm', 64, conv(scope + 'initial_conv', 7, 3, 64))
    cin = 64
    for g, (n, ch) in enumerate(zip(RESNET50_BLOCKS, RESNET50_CHANNELS)):
        for b in range(n):
            base = f'{scope}block_group_{g}/~/block_{b}/~/'
            for i, (k, a, c) in enumerate(((1, cin, ch // 4), (3, ch // 4, ch // 4),
                                           (1, ch // 4, ch))):
                bn(f'{base}batchnorm_{i}', c, conv(f'{base}conv_{i}', k, a, c))
            if b == 0:
                bn(base + 'shortcut_batchnorm', ch, conv(base + 'shortcut_conv', 1, cin, ch))
            cin = ch
    params['classifier'] = {'w': 0.02 * draw(2048, n_classes), 'b': 0.1 * draw(n_classes)}
    for head, sizes in (('projector', (2048, 16, 8)), ('predictor', (8, 16, 8))):
        params[f'{head}/~/linear'] = {'w': draw(*sizes[:2]), 'b': draw(sizes[1])}
        params[f'{head}/~/batch_norm'] = {'scale': draw(sizes[1]), 'offset': draw(sizes[1])}
        params[f'{head}/~/linear_1'] = {'w': draw(*sizes[1:]), 'b': draw(sizes[2])}
    return params, state


def official_module(name, *classes):
    """A module of this name (and its parents) in sys.modules holding these classes, so that
    pickle names them as the official code's."""
    parts = name.split('.')
    for i in range(1, len(parts) + 1):
        module = sys.modules.setdefault('.'.join(parts[:i]), types.ModuleType('.'.join(parts[:i])))
        if i > 1:  # (as an import leaves it: dill 0.4 finds functions through their parents)
            setattr(sys.modules['.'.join(parts[:i - 1])], parts[i - 1], module)
    for cls in classes:
        cls.__module__, cls.__qualname__ = name, cls.__name__
        setattr(sys.modules[name], cls.__name__, cls)


class _ByolExperimentState(NamedTuple):  # byol/byol_experiment.py
    online_params: Any
    target_params: Any
    online_state: Any
    target_state: Any
    opt_state: Any


class AddWeightDecayState(NamedTuple):  # byol/utils/optimizers.py
    """Stateless transformation."""


class ScaleByLarsState(NamedTuple):  # byol/utils/optimizers.py
    mu: Any


class EmptyState(NamedTuple):  # optax/_src/base.py: optax.scale's state
    """An empty state."""


class FlatMapping(dict):  # haiku/_src/data_structures.py of 2020: a dict subclass here
    """Older Haiku's mapping of parameters and states."""


def _reconstruct_array(fun, args, arr_state, aval_state):  # jax/_src/array.py, on the host
    """Rebuilds the numpy value, as JAX's does before it puts it on a device (here only for
    dill's own reading of the file, below; the project's reader never calls it)."""
    value = fun(*args)
    value.__setstate__(arr_state)
    return value


class JaxArray:
    """Pickles as a jax.Array does: its numpy value's reduction, wrapped in
    jax._src.array._reconstruct_array."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return _reconstruct_array, (*self.value.__reduce__(), {'weak_type': False})


def experiment(params, state, mapping):
    """The checkpoint's dict as the official Checkpointer dumps it, every mapping of `mapping`'s
    type."""
    def nest(tree):
        return mapping({k: mapping(v) for k, v in tree.items()})
    small = nest({'res_net50/~/initial_conv': {'w': np.ones((1, 1, 1, 1), np.float32)}})
    opt_state = (AddWeightDecayState(), ScaleByLarsState(mu=small), EmptyState())
    return _ByolExperimentState(nest(params), small, nest(state), small, opt_state)


def main():
    import dill
    official_module('byol.byol_experiment', _ByolExperimentState)
    official_module('byol.utils.optimizers', AddWeightDecayState, ScaleByLarsState)
    official_module('optax._src.base', EmptyState)
    official_module('haiku._src.data_structures', FlatMapping)
    official_module('jax._src.array', _reconstruct_array)
    old = tuple(map(int, dill.__version__.split('.')[:2])) < (0, 4)
    params, state = fixture_arrays()
    rng = np.array([0, 42], np.uint32)
    data = dict(experiment_state=experiment(params, state, FlatMapping if old else dict),
                step=RELEASED_STEP, rng=rng if old else JaxArray(rng))
    pickled = dill.dumps(data, protocol=2)
    globals_ = {arg for op, arg, _ in pickletools.genops(pickled) if op.name == 'GLOBAL'}
    if old:  # numpy's functions reached through dill's helpers, arrays by numpy's reduction
        expected = {'dill._dill _get_attr', 'dill._dill _import_module'}
    else:    # numpy's functions by name, arrays through dill's helper
        expected = {'dill._dill _create_array'}
    expected.add('dill._dill _create_namedtuple')
    assert expected <= globals_, f'not written as the official files are: {sorted(globals_)}'
    loaded = dill.loads(pickled)  # dill itself reads back what it wrote
    for tree, original in ((loaded['experiment_state'].online_params, params),
                           (loaded['experiment_state'].online_state, state)):
        assert all(np.array_equal(tree[m][k], v) for m in original for k, v in original[m].items())
    assert np.array_equal(loaded['rng'], rng) and loaded['step'] == RELEASED_STEP
    OUT.mkdir(exist_ok=True)
    path = OUT / f'dill-{dill.__version__}.pkl.xz'
    path.write_bytes(lzma.compress(pickled, preset=9 | lzma.PRESET_EXTREME))
    print(f'{path}: {len(pickled) / 1e6:.1f} MB pickled, {path.stat().st_size / 1e6:.2f} MB '
          f'compressed; globals: {", ".join(sorted(globals_))}')


if __name__ == '__main__':
    main()
