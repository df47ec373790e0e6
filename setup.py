"""Installable package for the HAT super-resolution reimplementation."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> list:
    lines = (HERE / 'requirements.txt').read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


setup(
    name='hat-sr',
    version='0.1.0',
    description='Hybrid Attention Transformer (HAT) for image super-resolution, faithful to the released models',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['hat', 'hat.*']),
    package_data={'hat': ['data/*.json', 'data/meta_info/*.txt']},
    install_requires=read_requirements(),
    # Optional: ONNX export and the ONNX backend; the Cog predictor and its HTTP server; the accuracy-vs-cost plot.
    extras_require={
        'onnx': ['onnx>=1.16', 'onnxruntime>=1.18', 'onnxscript>=0.2'],
        'serve': ['cog==0.23.1', 'coglet==0.23.1'],
        'plot': ['matplotlib>=3.7'],
    },
    entry_points={'console_scripts': ['hat-upscale = hat.upscale:cli', 'hat-export = hat.export:cli']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Image Processing',
    ],
)
