// Builds the renderer (Svelte 5) into dist/renderer, served by web mode and loaded by Electron.
// The page runs under a strict CSP (script-src/style-src 'self'): no inline scripts, no injected
// <style>; Svelte's component CSS is emitted into the one stylesheet file.
import { defineConfig } from 'vite';
import { svelte } from '@sveltejs/vite-plugin-svelte';

export default defineConfig({
  root: 'renderer',
  base: './', // relative asset URLs: works over http://127.0.0.1 and an Electron custom protocol alike
  plugins: [svelte({ configFile: false, emitCss: true })],
  build: {
    outDir: '../dist/renderer',
    emptyOutDir: true,
    target: 'es2022',
    cssCodeSplit: false,
    assetsInlineLimit: 0,
    modulePreload: { polyfill: false },
    sourcemap: false,
  },
});
