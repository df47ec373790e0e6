"""Parameter and multiply-add counts (hat/analysis/complexity.py) against the paper and against hand counts."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, tiny_hat_config
from hat.analysis import complexity
from hat.archs.hat_arch import HAT

# A HAT small enough to count by hand: 16x16 input, window 4 (16 windows of N = 16 tokens), OCAB window 6.
TINY = tiny_hat_config(depths=(2,))


@pytest.fixture(scope='module')
def paper() -> dict:
    return complexity.published_complexity()


@pytest.fixture(scope='module')
def hat_x4() -> complexity.Complexity:
    return complexity.count_complexity(complexity.variant_network('HAT', scale=4), size=64, name='HAT')


def test_hat_x4_parameters_are_exact(hat_x4):
    assert hat_x4.params == 20_772_507


def test_hat_x4_macs_match_the_paper_within_3_percent(hat_x4, paper):
    assert (paper['HAT']['params_m'], paper['HAT']['multi_adds_g']) == (20.8, 102.4)
    assert paper['HAT']['trust'] == {'params_m': 'authors', 'multi_adds_g': 'authors'}
    assert round(hat_x4.params / 1e6, 1) == paper['HAT']['params_m']
    # 103.88G counted; the paper states 102.4G (+1.4%).
    assert abs(hat_x4.total_macs / 1e9 - 102.4) / 102.4 < 0.03
    assert hat_x4.total_macs == sum(hat_x4.macs.values())
    assert hat_x4.macs['attention'] == 18_685_624_320  # see test_attention_macs_are_the_two_window_products


def test_hat_s_and_swinir_match_the_paper(paper):
    hat_s = complexity.count_complexity(complexity.variant_network('HAT-S'), name='HAT-S')
    assert hat_s.params == 9_621_183
    assert abs(hat_s.total_macs / 1e9 - paper['HAT-S']['multi_adds_g']) / paper['HAT-S']['multi_adds_g'] < 0.03
    swinir = complexity.count_complexity(complexity.variant_network('SwinIR'), name='SwinIR')
    assert round(swinir.params / 1e6, 1) == paper['SwinIR']['params_m'] == 11.9
    # The counting convention reproduces the paper's SwinIR figure to its last digit.
    assert round(swinir.total_macs / 1e9, 1) == paper['SwinIR']['multi_adds_g'] == 53.6


def test_attention_macs_are_the_two_window_products():
    """q @ k^T and attn @ v: windows x N_q x N_k x C each, for every HAB (N_k = N) and the OCAB (N_k = 6 * 6)."""
    with torch.device('meta'):
        net = HAT(**TINY)
    result = complexity.count_complexity(net, size=16)
    windows, n, c, ocab_keys, tokens, hidden = 16, 16, 12, 36, 256, 24
    hab = 2 * windows * n * n * c
    ocab = 2 * windows * n * ocab_keys * c
    assert result.macs['attention'] == 2 * hab + ocab
    # qkv + proj + fc1 + fc2 per token, in each of the 2 HABs and the OCAB
    assert result.macs['linear'] == 3 * tokens * (c * 3 * c + c * c + 2 * c * hidden)
    assert result.params == sum(p.numel() for p in net.parameters())


def test_conv_macs_of_a_plain_convolution():
    with torch.device('meta'):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1, groups=2))
    result = complexity.count_complexity(net, size=(10, 12))
    assert result.macs == {'conv': 10 * 12 * 8 * (3 * 9 + 4), 'linear': 0, 'attention': 0}
    assert result.input_size == (3, 10, 12)


def test_option_file_and_json_output(capsys):
    results = complexity.main(['--variants', '-opt', str(REPO / 'options/test/HAT-S_SRx4.yml'), '--json'])
    printed = json.loads(capsys.readouterr().out)
    assert [r['name'] for r in printed] == [results[0].name]
    assert printed[0]['params'] == 9_621_183
    assert printed[0]['total_macs'] == results[0].total_macs


def test_markdown_table_lists_the_paper_and_the_difference(capsys):
    complexity.main(['--variants', 'HAT'])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith('| HAT |'))
    assert '20,772,507' in row and '102.4' in row and '+1.4%' in row
    assert 'softmax' in table  # says what is not counted


def test_hat_l_multi_adds_are_labelled_as_counted_here(capsys, paper):
    """No source gives HAT-L's Multi-Adds: the table shows ours in their place, said to be ours; its parameters
    rest on one source and carry the dagger."""
    assert paper['HAT-L']['multi_adds_g'] is None and paper['HAT-L']['trust']['params_m'] == 'one source'
    complexity.main(['--variants', 'HAT-L', 'HAT-S'])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith('| HAT-L |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[1] == '40,846,575 (40.8M)' and cells[2] == '40.84M†'
    assert cells[7] == f'{cells[3]} (counted here)' and cells[8] == ''  # no published figure: no difference
    assert 'HAT-L: no published Multi-Adds has a source' in table
    hat_s = next(line for line in table.splitlines() if line.startswith('| HAT-S |'))
    assert '| 9.6M |' in hat_s and '| 54.9 |' in hat_s  # the authors' figures: unmarked
    assert '- [A] github.com/XPixelGroup/HAT' in table and '- [D] github.com/ming053l/DRCT' in table
    assert '† one source only' in table


def test_no_published_figures_at_other_scales(capsys):
    complexity.main(['--variants', 'HAT-S', '--scale', '2'])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('| HAT-S |'))
    assert [c.strip() for c in row.strip('|').split('|')][7:] == ['', '']


def test_bad_arguments_exit_with_status_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        complexity.main(['--variants', 'HAT-XL'])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        complexity.main(['--variants', '-opt', str(tmp_path / 'missing.yml')])
    assert exit_info.value.code == 2
