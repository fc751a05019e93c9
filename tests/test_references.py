"""The shipped reference tables: our derived layouts against them, and them
against the reference libraries they were extracted from."""

from __future__ import annotations

import functools
import os
import re

import pytest

from flax_resnet import layout
from flax_resnet import layout_compare
from flax_resnet import layout_report
from flax_resnet import references
from flax_resnet import zoo
from flax_resnet.references import extract
from flax_resnet.references import probe_gluon

REFERENCED = [name for name in zoo.list_models()
              if zoo.get_spec(name).reference is not None]
# Keras is not resnet*_v1's default reference; their layout must match it too.
KERAS_V1 = ('resnet50_v1', 'resnet101_v1', 'resnet152_v1')
EXACT = [name for name in zoo.list_models()
         if name.startswith(('gluon_', 'keras_'))]
ROW_FIELDS = {'stage', 'index', *layout_compare.COMPARED_FIELDS,
              'library_block', 'library_stride_layer'}
SHORTCUT_KINDS = {'identity', 'zero-pad', 'subsample', 'projection',
                  'avgpool+projection'}


def _entry(reference: str, model: str) -> dict:
  return references.load(reference)['models'][model]


@functools.lru_cache(maxsize=None)
def _layout(model: str, size: int, **overrides) -> layout.Layout:
  return layout.layout_of(model, size, **overrides)


def _problems(model: str, reference: str, entry_name: str = None,
              **overrides) -> list[str]:
  entry = _entry(reference, entry_name or model)
  derived = _layout(model, entry['input_size'], **overrides)
  return layout_compare.compare(derived, entry, reference)


# ------------------------------------------------- derived layout vs. tables


@pytest.mark.parametrize('model', REFERENCED)
def test_preset_matches_its_reference(model):
  reference = zoo.get_spec(model).reference
  assert _problems(model, reference) == []


@pytest.mark.parametrize('model', KERAS_V1)
def test_true_v1_presets_match_keras(model):
  assert _problems(model, 'keras') == []


def test_every_preset_reference_has_an_entry():
  for model in REFERENCED:
    reference = zoo.get_spec(model).reference
    assert model in references.load(reference)['models'], (model, reference)


def test_tables_follow_the_schema():
  for name in references.NAMES:
    table = references.load(name)
    assert table['reference'] == name
    assert table['extracted_by'] == (
        f'python -m flax_resnet.references.extract {name}')
    assert table['source'] and table['notes']
    for model, entry in table['models'].items():
      assert set(entry['stem']) >= {'out_channels', 'out_size', 'params'}
      keys = [(row['stage'], row['index']) for row in entry['blocks']]
      assert keys == sorted(keys) and len(set(keys)) == len(keys), model
      for row in entry['blocks']:
        assert set(row) == ROW_FIELDS, (name, model, row)
        assert row['stride_at'] in ('1x1', '3x3', 'none')
        assert row['shortcut'] in SHORTCUT_KINDS
        assert (row['stride_at'] == 'none') == (
            row['in_size'] == row['out_size']), (name, model, row)


def test_every_count_is_the_librarys_own():
  # No nulls: every table holds the library's real counts.
  for name in references.NAMES:
    for model, entry in references.load(name)['models'].items():
      counts = [entry['stem']['params'], entry['total_params']] + [
          row['params'] for row in entry['blocks']]
      assert None not in counts, (name, model)


@pytest.mark.parametrize('model', EXACT)
def test_exact_presets_match_with_parameter_counts(model):
  reference = zoo.get_spec(model).reference
  entry = _entry(reference, model)
  assert entry.get('counts_compared', True), model
  derived = _layout(model, 224)
  assert layout_compare.compare(derived, entry, reference) == []
  assert derived.total_params == entry['total_params']
  if reference.startswith('keras'):
    # count_params() counts BN moving statistics: our params + batch_stats.
    assert derived.total_variables == entry['total_variables']


def test_layout_only_presets_say_why_counts_differ():
  for reference, model, fix in (('gluon_v1', 'resnet50_v1',
                                 'gluon_resnet50_v1'),
                                ('gluon_v2', 'resnet50_v2',
                                 'gluon_resnet50_v2'),
                                ('keras', 'resnet50_v1', 'keras_resnet50')):
    entry = _entry(reference, model)
    assert entry['counts_compared'] is False
    assert fix in entry['counts_note']
    # The counts would differ: that is why they are not compared.
    assert _layout(model, 224).total_params != entry['total_params']
  # resnet18_v1 is exactly Gluon's: compared.
  assert _entry('gluon_v1', 'resnet18_v1').get('counts_compared', True)


def test_published_parameter_counts():
  # Figures from REFERENCE.md (paper Table 6, torchvision meta, Keras).
  paper = {'resnet20': 269_722, 'resnet32': 464_154, 'resnet44': 658_586,
           'resnet56': 853_018, 'resnet110': 1_727_962,
           'resnet1202': 19_421_274}
  for model, count in paper.items():
    assert _entry('paper', model)['total_params'] == count
  torchvision = {'resnet18': 11_689_512, 'resnet34': 21_797_672,
                 'resnet50': 25_557_032, 'resnet101': 44_549_160,
                 'resnet152': 60_192_808, 'resnext50_32x4d': 25_028_904,
                 'wide_resnet50_2': 68_883_240}
  for model, count in torchvision.items():
    assert _entry('torchvision', model)['total_params'] == count
  assert _entry('keras', 'resnet50_v1')['library_total_params'] == 25_636_712
  assert _entry('keras_v2',
                'keras_resnet50_v2')['library_total_params'] == 25_613_800
  assert _entry('keras', 'keras_resnet50')['total_variables'] == 25_636_712


# ---------------------------------------------- overrides must be caught


def test_stride_on_the_1x1_mismatches_torchvision():
  problems = _problems('resnet50', 'torchvision', stride_in='1x1')
  assert problems == [
      f"stage {s} block 0: strided conv is '1x1' here but '3x3' in "
      'torchvision' for s in (2, 3, 4)]


def test_option_c_turns_identities_into_projections():
  problems = _problems('resnet50', 'torchvision', shortcut='C')
  rows = [(row['stage'], row['index'])
          for row in _entry('torchvision', 'resnet50')['blocks']]
  shortcut_lines = [p for p in problems if ': shortcut is ' in p]
  assert shortcut_lines == [
      f"stage {s} block {i}: shortcut is 'projection' here but 'identity' "
      'in torchvision' for s, i in rows if i > 0]
  for s, i in rows:
    parameter_line = [p for p in problems
                      if p.startswith(f'stage {s} block {i}: parameters')]
    assert len(parameter_line) == (1 if i > 0 else 0), (s, i)
  assert problems[-1].startswith('total parameters ')


def test_option_b_mismatches_the_paper():
  problems = _problems('resnet20', 'paper', shortcut='B')
  for stage in (2, 3):
    assert (f"stage {stage} block 0: shortcut is 'projection' here but "
            "'zero-pad' in paper") in problems
    assert (f'stage {stage} block 0: BN on the shortcut is True here but '
            'False in paper') in problems
  assert not [p for p in problems if p.startswith('stage 1 ')]
  assert problems[-1] == 'total parameters 272,474 here, 269,722 in paper'


def test_keras_v2_stride_placement_is_reported():
  problems = _problems('resnet50_v2', 'keras_v2', 'keras_resnet50_v2')
  for stage, last in ((1, 2), (2, 3), (3, 5)):
    assert (f"stage {stage} block {last}: strided conv is 'none' here but "
            "'3x3' in keras_v2") in problems
    assert (f"stage {stage} block {last}: shortcut is 'identity' here but "
            "'subsample' in keras_v2") in problems
  for stage in (2, 3, 4):
    assert (f"stage {stage} block 0: strided conv is '3x3' here but 'none' "
            'in keras_v2') in problems
  assert "stage 1 block 2: output size is 56x56 here but 28x28 in keras_v2" \
      in problems


# ------------------------------------------- tables vs. the libraries now


def _assert_reextracted(requests):
  fresh = extract.extract_tables(requests)
  for name, table in fresh.items():
    shipped = references.load(name)
    assert table['notes'] == shipped['notes'], name
    assert extract.differences(table, shipped) == [], name
    for model in requests[name]:
      assert table['models'][model] == shipped['models'][model]
  return fresh


def test_torchvision_reextracts():
  _assert_reextracted({'torchvision': ['resnet18', 'resnet50',
                                       'resnext50_32x4d']})


def test_paper_reextracts():
  _assert_reextracted({'paper': ['resnet20', 'resnet56']})


def test_timm_reextracts():
  reason = extract.unavailable('timm')
  if reason:
    pytest.skip(reason)
  _assert_reextracted({'timm': ['resnet50d']})


def test_keras_reextracts():
  reason = extract.unavailable('keras')
  if reason:
    pytest.skip(reason)
  fresh = _assert_reextracted({'keras': ['keras_resnet50', 'resnet50_v1'],
                               'keras_v2': ['keras_resnet50_v2']})
  assert fresh['keras']['models']['keras_resnet50'][
      'library_total_params'] == 25_636_712


def test_gluon_reextracts():
  reason = probe_gluon.unavailable()
  if reason:
    if os.environ.get('CI') == 'true':
      pytest.fail(f'CI=true, but MXNet is not available: {reason}')
    pytest.skip(f'MXNet is not available: {reason}')
  _assert_reextracted({'gluon_v1': ['gluon_resnet18_v1', 'gluon_resnet50_v1',
                                    'resnet50_v1'],
                       'gluon_v2': ['gluon_resnet50_v2', 'resnet50_v2']})


def test_extracted_rows_come_from_the_running_model():
  # A faithful extractor must see what the library runs: torchvision's
  # bottleneck strides on its 3x3, named conv2 by torchvision itself.
  entry = _entry('torchvision', 'resnet50')
  strided = [row for row in entry['blocks'] if row['stride_at'] != 'none']
  assert [row['library_stride_layer'] for row in strided] == [
      'layer2.0.conv2', 'layer3.0.conv2', 'layer4.0.conv2']
  assert [row['library_stride_layer'] for row in
          _entry('gluon_v1', 'resnet50_v1')['blocks']
          if row['stride_at'] != 'none'] == [
              'features.5.0.body.0', 'features.6.0.body.0',
              'features.7.0.body.0']


# ------------------------------------------------------------------- the CLI


def _table_rows(text: str) -> list[list[str]]:
  """The block rows of the printed table, split into columns."""
  return [re.split(r'\s{2,}', line.strip()) for line in text.splitlines()
          if re.match(r'^\d+\s+\d+\s', line)]


def test_cli_resnet50_shows_the_stage1_projection(capsys):
  assert layout_report.main(['resnet50']) == 0
  out = capsys.readouterr().out
  rows = _table_rows(out)
  assert rows[0][:4] == ['1', '0', '64->256', '56->56']
  assert rows[0][-2] == '1x1 conv s1 + BN'
  assert 'the projection is a 1x1 with stride 1 (64->256)' in out
  assert 'reference torchvision: MATCH' in out


def test_cli_resnet18_projections_all_have_stride_2(capsys):
  assert layout_report.main(['resnet18']) == 0
  out = capsys.readouterr().out
  rows = _table_rows(out)
  assert len(rows) == 8
  assert all(row[-2] == 'identity' for row in rows if row[0] == '1')
  projections = [row for row in rows if 'conv' in row[-2]]
  assert len(projections) == 3
  assert all(row[-2] == '1x1 conv s2 + BN' for row in projections)
  assert 'stage 1: no projection' in out


def test_cli_resnet20_zero_pad_shortcuts_have_no_parameters(capsys):
  assert layout_report.main(['resnet20']) == 0
  out = capsys.readouterr().out
  shortcuts = [row[-2] for row in _table_rows(out)
               if row[-2] != 'identity']
  assert shortcuts == ['A: x[::2, ::2] + 16 zero channels (0 params)',
                       'A: x[::2, ::2] + 32 zero channels (0 params)']
  assert 'reference paper: MATCH' in out


def test_cli_reports_a_mismatch_in_words(capsys):
  assert layout_report.main(['resnet50', 'stride_in=1x1']) == 1
  out = capsys.readouterr().out
  assert 'reference torchvision: MISMATCH in 3 place(s)' in out
  assert ('    stage 2 block 0: strided conv 1x1 here vs 3x3 in torchvision'
          in out)
  # The way out names this CLI's flags, not the config's fields.
  assert ("this model differs from it in: stride_in '3x3' (here stride_in "
          "'1x1')") in out
  assert 'pass --reference none to skip' in out and 'reference=None' not in out


def test_cli_mismatch_groups_strides_first_then_aligned_counts_with_cause(
    capsys):
  """Was 19 lines of 'parameters is 75008 here but 75328', strides among them."""
  assert layout_report.main(['resnet50', '--reference', 'gluon_v1',
                      '--reference-model', 'gluon_resnet50_v1']) == 1
  out = capsys.readouterr().out
  lines = out[out.index('MISMATCH'):].splitlines()
  assert lines[0] == 'MISMATCH in 20 place(s)'
  assert lines[1] == '  strides, shortcuts and shapes:'
  assert lines[2:5] == [f'    stage {s} block 0: strided conv 3x3 here vs '
                        '1x1 in gluon_v1' for s in (2, 3, 4)]
  assert lines[5] == '  parameter counts:'
  counts = lines[6:23]
  assert counts[0] == (
      '    stage 1 block 0: parameters     75,008 here vs     75,328 in '
      'gluon_v1  (+320: conv biases on conv1, conv3)')
  assert counts[-1] == (
      '    total:           parameters 25,557,032 here vs 25,575,912 in '
      'gluon_v1  (+18,880: conv biases on conv1, conv3)')
  assert len({line.index(' here vs ') for line in counts}) == 1  # aligned
  assert lines[23].startswith('The preset gluon_resnet50_v1 matches gluon_v1')


def test_cli_reference_without_the_model_compares_its_named_variant(capsys):
  """Was exit 2 and 'set reference=None' (a config field, not a flag)."""
  assert layout_report.main(['resnet50', '--reference', 'gluon_v1']) == 1
  out = capsys.readouterr().out
  assert ('reference gluon_v1 has no entry resnet50: comparing with '
          'resnet50_v1; the others: gluon_resnet50_v1 (--reference-model '
          'NAME)') in out
  assert 'reference gluon_v1 (entry resnet50_v1): MISMATCH in 3 place(s)' in out


def test_cli_missing_entry_names_the_cli_flag_and_the_closest_entries(capsys):
  assert layout_report.main(['resnet20', '--reference', 'torchvision']) == 2
  err = capsys.readouterr().err
  assert ("Name one with --reference-model NAME (closest: resnet50, "
          'resnet152)') in err
  assert 'pass --reference none to skip' in err
  assert 'reference=None' not in err
  # The underscore spelling of the flag is taken too.
  assert layout_report.main(['resnet50', '--reference', 'gluon_v1',
                      '--reference_model', 'resnet50_v1']) == 1


def test_cli_keras_v2_mismatch_and_keras_match(capsys):
  assert layout_report.main(['resnet50_v2', '--reference', 'keras_v2',
                      '--reference-model', 'keras_resnet50_v2']) == 1
  assert ('    stage 2 block 3: strided conv    none     here vs 3x3       '
          'in keras_v2') in capsys.readouterr().out
  assert layout_report.main(['resnet50_v1', '--reference', 'keras']) == 0
  out = capsys.readouterr().out
  assert 'reference keras: MATCH' in out
  assert 'parameter counts not compared: Keras gives every conv a bias' in out


def test_cli_keras_v2_preset_matches_with_counts(capsys):
  assert layout_report.main(['keras_resnet50_v2']) == 0
  out = capsys.readouterr().out
  assert ('reference keras_v2: MATCH (16 blocks, stem, strides, shortcuts '
          'and parameter counts agree)') in out
  rows = _table_rows(out)
  assert rows[2][-2] == 'maxpool 1x1/2: x[::2, ::2] (0 params)'
  # The notes say, in words, what makes this net differ from torchvision.
  assert 'each stage strides in its LAST block' in out
  assert 'zero padding differs from -inf padding' in out
  assert 'conv biases on: stem, conv3, shortcut' in out
  assert 'BatchNorm epsilon 1.001e-05' in out


def test_cli_gluon_answers_the_stride_question(capsys):
  # Gluon's resnet50_v1: stage 1's projection has stride 1 (the max-pool
  # already halved the size); resnet18_v1 has no stage-1 projection and
  # stride-2 projections elsewhere.
  assert layout_report.main(['gluon_resnet50_v1']) == 0
  out = capsys.readouterr().out
  assert 'the projection is a 1x1 with stride 1 (64->256)' in out
  assert 'reference gluon_v1: MATCH' in out and 'parameter counts agree' in out
  assert 'conv biases on: conv1, conv3' in out
  assert layout_report.main(['gluon_resnet18_v1']) == 0
  rows = _table_rows(capsys.readouterr().out)
  assert [r[-2] for r in rows if 'conv' in r[-2]] == ['1x1 conv s2 + BN'] * 3
